// A dispatch counter for libtorch, loaded with LD_PRELOAD into any process that runs libtorch
// (the prefloop binary, or python with torch): a global RecordFunction callback counts every
// ATen op the dispatcher runs — the ops a caller dispatched itself (top level), all of them
// (composites' inner ops included), and the kernels among them: ops that dispatch nothing
// further and are not views, reshapes or allocations, i.e. the ones that launch work on the
// device. It writes the three to $OP_COUNT_FILE at exit. scripts/count-ops builds it and turns
// two runs' counts into ops per decode step.
#include <ATen/record_function.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

std::atomic<long long> top_level{0};
std::atomic<long long> all_ops{0};
std::atomic<long long> kernels{0};
// Per open op on this thread: whether it has dispatched an op of its own.
thread_local std::vector<bool> open;

// Ops that, dispatching nothing further, only make a new view, reshape or allocation: no work
// on the device.
bool launches_nothing(const char* name) {
  static const char* const none[] = {
      "aten::view",        "aten::_unsafe_view", "aten::as_strided", "aten::slice",
      "aten::narrow",      "aten::select",       "aten::transpose",  "aten::t",
      "aten::permute",     "aten::expand",       "aten::unsqueeze",  "aten::squeeze",
      "aten::alias",       "aten::detach",       "aten::empty",      "aten::empty_strided",
      "aten::empty_like",  "aten::split",        "aten::chunk",      "aten::unbind",
      "aten::resize_",     "aten::lift_fresh",   "aten::_reshape_alias", "aten::view_as",
      "aten::expand_as",   "aten::contiguous",   "aten::reshape",    "aten::to",
      "aten::flatten",     "aten::unflatten",    "aten::result_type", "aten::split_with_sizes",
  };
  for (const char* n : none) {
    if (std::strcmp(name, n) == 0) return true;
  }
  return false;
}

struct Counter {
  at::CallbackHandle handle;

  Counter() {
    handle = at::addGlobalCallback(
        at::RecordFunctionCallback(
            [](const at::RecordFunction&) -> std::unique_ptr<at::ObserverContext> {
              all_ops++;
              if (open.empty()) top_level++;
              else open.back() = true;
              open.push_back(false);
              return nullptr;
            },
            [](const at::RecordFunction& fn, at::ObserverContext*) {
              bool nested = open.back();
              open.pop_back();
              if (!nested && !launches_nothing(fn.name())) kernels++;
            })
            .scopes({at::RecordScope::FUNCTION}));
  }

  ~Counter() {
    const char* path = std::getenv("OP_COUNT_FILE");
    if (path == nullptr) return;
    if (FILE* f = std::fopen(path, "w")) {
      std::fprintf(f, "%lld %lld %lld\n", top_level.load(), all_ops.load(), kernels.load());
      std::fclose(f);
    }
  }
};

Counter counter;

}  // namespace
