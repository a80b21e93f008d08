/* C++ exceptions on wasm32-wasi: clang emits calls to the C++ ABI's throw functions, but
 * Debian's wasm32 libc++abi is built without exception support, so nothing defines them.
 * A `throw` (a std::vector::at out of range, a bad_alloc) ends the program as an uncaught
 * exception would: a message on stderr and abort(), which the sandbox reports as a runtime
 * error. Linked into every C++ program. */
#include <stdio.h>
#include <stdlib.h>

static void uncaught(void) {
    fputs("terminate called after throwing an exception (C++ exceptions abort in the sandbox)\n",
          stderr);
    abort();
}

void *__cxa_allocate_exception(unsigned long size) {
    (void)size;
    uncaught();
    return NULL;
}

void __cxa_throw(void *exception, void *type, void (*destructor)(void *)) {
    (void)exception;
    (void)type;
    (void)destructor;
    uncaught();
}
