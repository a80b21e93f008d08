// A dispatch counter for libtorch, loaded with LD_PRELOAD into any process that runs libtorch
// (the prefloop binary, or python with torch): a global RecordFunction callback counts every
// ATen op the dispatcher runs — the ops a caller dispatched itself (top level) and all of
// them, composites' inner ops included — and writes both to $OP_COUNT_FILE at exit.
// scripts/count-ops builds it and turns two runs' counts into ops per decode step.
#include <ATen/record_function.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace {

std::atomic<long long> top_level{0};
std::atomic<long long> all_ops{0};
thread_local int depth = 0;

struct Counter {
  at::CallbackHandle handle;

  Counter() {
    handle = at::addGlobalCallback(
        at::RecordFunctionCallback(
            [](const at::RecordFunction&) -> std::unique_ptr<at::ObserverContext> {
              all_ops++;
              if (depth++ == 0) top_level++;
              return nullptr;
            },
            [](const at::RecordFunction&, at::ObserverContext*) { depth--; })
            .scopes({at::RecordScope::FUNCTION}));
  }

  ~Counter() {
    const char* path = std::getenv("OP_COUNT_FILE");
    if (path == nullptr) return;
    if (FILE* f = std::fopen(path, "w")) {
      std::fprintf(f, "%lld %lld\n", top_level.load(), all_ops.load());
      std::fclose(f);
    }
  }
};

Counter counter;

}  // namespace
