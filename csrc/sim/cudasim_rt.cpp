// The CPU executor's runtime (see cudasim.h): the cudart entry points kernel drivers call, the fibers and
// threads that run CUDA threads, barriers and warp instructions, the pk::ptx primitives (mma, ldmatrix,
// cp.async) as the PTX ISA defines them, and the per-launch counters.
//
// This file is never compiled with the counters' instrumentation (cudasim_count.cpp): its own memory accesses
// are the executor's, not the kernel's.
#include "cudasim.h"
#include "cudasim_prof.h"
#include "peft_kernels/ptx.cuh"

#include <cuda_runtime_api.h>
#include <link.h>
#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace cudasim {
namespace {

// ---- modes and environment ----------------------------------------------------------------------------------
double timeout_s() {
  const char* e = std::getenv("CUDASIM_TIMEOUT");
  return e ? std::atof(e) : 10.0;
}
bool fiber_mode() {
  static const bool f = [] {
    const char* m = std::getenv("CUDASIM_MODE");
    return m == nullptr || std::strcmp(m, "threads") != 0;
  }();
  return f;
}

// ---- "device" memory ----------------------------------------------------------------------------------------
// Every cudaMalloc'd range, so the counters can tell a kernel's global accesses from its stack and registers.
std::map<uintptr_t, size_t>& allocations() {
  static std::map<uintptr_t, size_t> m;
  return m;
}
std::mutex g_alloc_mutex;
// Names given to cudaMalloc'd buffers (label_buffer), by base address: the counters report each buffer's traffic.
std::map<uintptr_t, std::string>& labels() {
  static std::map<uintptr_t, std::string> m;
  return m;
}

}  // namespace

void label_buffer(const void* p, const char* name) {
  std::lock_guard<std::mutex> lk(g_alloc_mutex);
  const auto base = reinterpret_cast<uintptr_t>(p);
  if (allocations().count(base) == 0) fail("label_buffer: not the start of a cudaMalloc'd buffer");
  labels()[base] = name;
}

// ---- errors ---------------------------------------------------------------------------------------------------
void fail(const char* what) {
  std::fprintf(stderr, "cudasim: %s\n", what);
  std::fflush(stderr);
  std::abort();
}
void fail_at(const Loc& loc, const char* what) {
  std::fprintf(stderr, "cudasim: %s:%u: %s\n", loc.file_name(), loc.line(), what);
  std::fflush(stderr);
  std::abort();
}

namespace {

// ---- blocks, warps, threads -----------------------------------------------------------------------------------
struct Barrier {
  std::mutex m;
  std::condition_variable cv;
  int expected = 0, arrived = 0, initial = 0;
  unsigned long gen = 0;
  const char* name = "barrier";
  bool strict = false;  // strict: every original participant must arrive (no thread may have exited)
  const char* site_file = nullptr;
  unsigned site_line = 0, site_col = 0;
  void reset(int n, const char* nm, bool st) {
    expected = initial = n;
    arrived = 0;
    gen = 0;
    name = nm;
    strict = st;
    site_file = nullptr;
  }
};

struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Block;
struct Ctx {
  dim3 tid, bid, bdim, gdim;
  Block* blk = nullptr;
  int lane = 0, warp = 0;
  // cp.async state of this thread: committed groups (oldest first) and the group being formed.
  std::vector<std::vector<PendingCopy>> groups;
  std::vector<PendingCopy> open_group;
  // occurrence count of each instruction (counters: the n-th execution of an instruction by each lane of a
  // warp is one warp instruction).
  std::unordered_map<uint64_t, uint32_t> occurrences;
};

struct Warp {
  Barrier bar;
  void* slot[32] = {};
  int lanes = 0;  // threads the warp was launched with
  unsigned launched_mask = 0;
  std::atomic<unsigned> live{0};
  // instruction executed when the barrier completes (warp_instruction), or none
  void (*op)(void* const*, void*) = nullptr;
  void* op_ctx = nullptr;
  prof::WarpGroups groups;
};

struct Block {
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<unsigned char> dyn;
};

thread_local Ctx* t_ctx = nullptr;
Ctx& ctx() { return *t_ctx; }
Warp& my_warp() { return ctx().blk->warps[ctx().warp]; }

// ---- fibers -----------------------------------------------------------------------------------------------------
// A CUDA thread as a fiber on the launching OS thread. On x86-64 without sanitizers the switch is a dozen
// instructions (ucontext's swapcontext makes a sigprocmask system call on every switch, ~0.4 us here: a
// 4096x4096 tensor-core GEMM at M = 2048 switches ~10^8 times); sanitizer builds keep ucontext, which the
// sanitizers know.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define CUDASIM_FAST_SWITCH 1
extern "C" void cudasim_switch(void** save_sp, void* to_sp);
asm(R"(
  .text
  .p2align 4
  .type cudasim_switch,@function
cudasim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudasim_switch, .-cudasim_switch
)");
#else
#define CUDASIM_FAST_SWITCH 0
#endif

struct Fiber {
  Ctx c;
  bool done = false;
#if CUDASIM_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

constexpr size_t kStack = 128 * 1024;
thread_local Fiber* t_fiber = nullptr;
thread_local const std::function<void()>* t_body = nullptr;
unsigned long g_progress = 0;
#if CUDASIM_FAST_SWITCH
thread_local void* t_sched_sp = nullptr;
#else
thread_local ucontext_t t_sched;
#endif

void thread_exit();

void fiber_yield() {
#if CUDASIM_FAST_SWITCH
  cudasim_switch(&t_fiber->sp, t_sched_sp);
#else
  swapcontext(&t_fiber->uc, &t_sched);
#endif
}

void fiber_main() {
  (*t_body)();
  thread_exit();
  t_fiber->done = true;
  ++g_progress;
#if CUDASIM_FAST_SWITCH
  void* dead;
  cudasim_switch(&dead, t_sched_sp);
  std::abort();  // a finished fiber is never resumed
#endif
}

// ---- barriers ---------------------------------------------------------------------------------------------------
void complete(Barrier& b, Warp* w) {
  if (b.strict && b.expected != b.initial) {
    char msg[240];
    std::snprintf(msg, sizeof msg, "%s at %s:%u completed with %d of %d threads (others exited or diverged): "
                  "undefined on a GPU", b.name, b.site_file, b.site_line, b.expected, b.initial);
    fail(msg);
  }
  if (w != nullptr && w->op != nullptr) {
    w->op(w->slot, w->op_ctx);
    w->op = nullptr;
  }
  b.arrived = 0;
  ++b.gen;
  b.site_file = nullptr;
  if (fiber_mode()) ++g_progress;
  b.cv.notify_all();
}

// Arrive at `b` from `loc` and wait for the others; the completing thread runs `op` (a warp instruction) on
// w's slots. The instruction is recorded under the barrier's lock: every lane names the same one.
void arrive_and_wait(Barrier& b, Warp* w, const Loc& loc, void (*op)(void* const*, void*) = nullptr,
                     void* op_ctx = nullptr, const char* what = nullptr) {
  std::unique_lock<std::mutex> lk(b.m, std::defer_lock);
  if (!fiber_mode()) lk.lock();
  if (w != nullptr) {
    w->op = op;
    w->op_ctx = op_ctx;
    b.name = what != nullptr ? what : "warp-collective op";
  }
  if (b.site_file == nullptr) {
    b.site_file = loc.file_name();
    b.site_line = loc.line();
    b.site_col = loc.column();
  } else if (b.site_line != loc.line() || b.site_col != loc.column() || std::strcmp(b.site_file, loc.file_name()) != 0) {
    char msg[400];
    std::snprintf(msg, sizeof msg, "DIVERGENT %s: threads wait at %s:%u:%u and %s:%u:%u", b.name, b.site_file,
                  b.site_line, b.site_col, loc.file_name(), loc.line(), loc.column());
    fail(msg);
  }
  const unsigned long g = b.gen;
  if (++b.arrived == b.expected) {
    complete(b, w);
    return;
  }
  if (fiber_mode()) {
    while (b.gen == g) fiber_yield();
    return;
  }
  if (!b.cv.wait_for(lk, std::chrono::duration<double>(timeout_s()), [&] { return b.gen != g; })) {
    char msg[300];
    std::snprintf(msg, sizeof msg, "DEADLOCK in %s at %s:%u: %d of %d threads arrived", b.name, b.site_file,
                  b.site_line, b.arrived, b.expected);
    fail(msg);
  }
}

void drop(Barrier& b, Warp* w) {  // an exited thread no longer participates
  std::unique_lock<std::mutex> lk(b.m, std::defer_lock);
  if (!fiber_mode()) lk.lock();
  --b.expected;
  if (b.expected > 0 && b.arrived == b.expected) complete(b, w);
}

void thread_exit() {
  Warp& w = my_warp();
  w.live.fetch_and(~(1u << ctx().lane));
  drop(w.bar, &w);
  drop(ctx().blk->bar, nullptr);
}

void check_mask(unsigned mask, const char* op, const Loc& loc) {
  const Warp& w = my_warp();
  if (mask != w.launched_mask && mask != 0xffffffffu) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s: partial mask 0x%08x is not supported by cudasim", op, mask);
    fail_at(loc, msg);
  }
}

// ---- profiling state ----------------------------------------------------------------------------------------------
prof::Launch* g_launch = nullptr;  // the launch being profiled, or none

}  // namespace

// ---- kernel-facing API --------------------------------------------------------------------------------------------
const dim3& thread_idx() { return ctx().tid; }
const dim3& block_idx() { return ctx().bid; }
const dim3& block_dim() { return ctx().bdim; }
const dim3& grid_dim() { return ctx().gdim; }
int lane_id() { return ctx().lane; }
void* dyn_smem() { return ctx().blk->dyn.data(); }

void syncthreads(const Loc& loc) { arrive_and_wait(ctx().blk->bar, nullptr, loc); }
void syncwarp(unsigned mask, const Loc& loc) {
  check_mask(mask, "__syncwarp", loc);
  arrive_and_wait(my_warp().bar, nullptr, loc);
}

namespace {
struct ShflLane {
  uint64_t in, out;
  int src;
};
void shfl_op(void* const* all, void* warp) {
  const Warp& w = *static_cast<const Warp*>(warp);
  for (int l = 0; l < w.lanes; ++l) {
    if (!((w.live.load() >> l) & 1)) continue;
    auto* me = static_cast<ShflLane*>(all[l]);
    const int s = me->src;
    me->out = (s >= 0 && s < w.lanes && ((w.live.load() >> s) & 1)) ? static_cast<ShflLane*>(all[s])->in : me->in;
  }
}
struct VoteLane {
  bool p;
  unsigned out;
};
void vote_op(void* const* all, void* warp) {
  const Warp& w = *static_cast<const Warp*>(warp);
  unsigned r = 0;
  for (int l = 0; l < w.lanes; ++l)
    if (((w.live.load() >> l) & 1) && static_cast<VoteLane*>(all[l])->p) r |= 1u << l;
  for (int l = 0; l < w.lanes; ++l)
    if ((w.live.load() >> l) & 1) static_cast<VoteLane*>(all[l])->out = r;
}

// Deposits this lane's operand pointer and runs `op` when the whole warp has arrived.
void collective(void* mine, void (*op)(void* const*, void*), void* op_ctx, const Loc& loc,
                const char* what = nullptr) {
  Warp& w = my_warp();
  w.slot[ctx().lane] = mine;
  arrive_and_wait(w.bar, &w, loc, op, op_ctx, what);
}
}  // namespace

uint64_t shfl_bits(unsigned mask, uint64_t bits, int src_lane, const char* op, const Loc& loc) {
  check_mask(mask, op, loc);
  ShflLane me{bits, 0, src_lane};
  collective(&me, shfl_op, &my_warp(), loc);
  return me.out;
}
unsigned ballot(unsigned mask, bool p, const Loc& loc) {
  check_mask(mask, "vote", loc);
  VoteLane me{p, 0};
  collective(&me, vote_op, &my_warp(), loc);
  return me.out;
}
unsigned active_mask() { return my_warp().live.load(); }

namespace {
// A warp instruction: every lane of a full, converged warp passes `mine`; the last to arrive calls
// op(all[32]) with the 32 lanes' pointers, then every lane continues. `what` names it in error messages.
void warp_instruction(const char* what, void* mine, void (*op)(void* const*, void*), void* op_ctx, const Loc& loc) {
  const Warp& w = my_warp();
  if (w.lanes != 32) {
    char msg[200];
    std::snprintf(msg, sizeof msg, "%s needs all 32 lanes of the warp; warp %d of this block has %d threads", what,
                  ctx().warp, w.lanes);
    fail_at(loc, msg);
  }
  if (w.live.load() != 0xffffffffu) {
    char msg[200];
    std::snprintf(msg, sizeof msg, "%s reached with lanes missing (live mask 0x%08x): all 32 lanes must execute it",
                  what, w.live.load());
    fail_at(loc, msg);
  }
  collective(mine, op, op_ctx, loc, what);
}
}  // namespace

void count_flops(int64_t n) {
  if (g_launch != nullptr) g_launch->cur.flops += double(n);
}

// ---- profiling: the address classifier and the per-warp grouping of lane accesses ----------------------------------
namespace prof {
namespace {
// Writable segments of every loaded module: where function-local statics (static __shared__) live.
std::vector<std::pair<uintptr_t, uintptr_t>> g_static_ranges;
int collect_segments(dl_phdr_info* info, size_t, void*) {
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W)) {
      const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
      g_static_ranges.emplace_back(lo, lo + ph.p_memsz);
    }
  }
  return 0;
}
}  // namespace

void refresh_static_ranges() {
  // glibc counts module loads and unloads: the ranges are rebuilt only when a module came or went (a torch
  // process has ~150 modules; the _sim tests launch thousands of kernels).
  static std::pair<unsigned long long, unsigned long long> seen{~0ull, ~0ull};
  std::pair<unsigned long long, unsigned long long> now;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        *static_cast<std::pair<unsigned long long, unsigned long long>*>(out) = {info->dlpi_adds, info->dlpi_subs};
        return 1;  // the counts are the same in every entry: one is enough
      },
      &now);
  if (now == seen) return;
  seen = now;
  g_static_ranges.clear();
  dl_iterate_phdr(collect_segments, nullptr);
}

bool is_shared(uintptr_t a, size_t n) {
  if (t_ctx == nullptr || t_ctx->blk == nullptr) return false;
  const auto& dyn = t_ctx->blk->dyn;
  const auto lo = reinterpret_cast<uintptr_t>(dyn.data());
  if (a >= lo && a + n <= lo + dyn.size()) return true;
  for (const auto& [b, e] : g_static_ranges)
    if (a >= b && a + n <= e) return true;
  return false;
}

const std::pair<const uintptr_t, size_t>* find_allocation(uintptr_t a) {
  auto& m = allocations();
  auto it = m.upper_bound(a);
  if (it == m.begin()) return nullptr;
  --it;
  return a < it->first + it->second ? &*it : nullptr;
}

std::string label_of(uintptr_t base) {
  std::lock_guard<std::mutex> lk(g_alloc_mutex);
  const auto it = labels().find(base);
  return it == labels().end() ? std::string() : it->second;
}

Launch* current() { return g_launch; }

// One lane's access of `n` bytes at `a` by instruction `pc`: joins the warp instruction it belongs to (the
// same instruction's same occurrence in the other lanes); a complete warp instruction is costed at once.
void access(uint64_t pc, const void* p, size_t n, bool write) {
  Launch* L = g_launch;
  if (L == nullptr || t_ctx == nullptr || t_ctx->blk == nullptr) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  Space space;
  if (is_shared(a, n)) {
    space = Space::kShared;
  } else if (find_allocation(a) != nullptr) {
    space = Space::kGlobal;
  } else {
    return;  // stack, registers, the executor's own memory
  }
  Ctx& c = *t_ctx;
  const uint32_t occurrence = c.occurrences[pc]++;
  Warp& w = c.blk->warps[c.warp];
  Group& g = w.groups.map[GroupKey{pc, occurrence}];
  if (g.n == 0) {
    g.space = space;
    g.write = write;
  }
  g.lane[g.n] = static_cast<uint8_t>(c.lane);
  g.addr[g.n] = a;
  g.size[g.n] = static_cast<uint32_t>(n);
  if (++g.n == w.lanes) {
    L->cost(g);
    w.groups.map.erase(GroupKey{pc, occurrence});
  }
}

}  // namespace prof

// ---- grids ---------------------------------------------------------------------------------------------------------------
namespace {

std::vector<Fiber>& fiber_pool() {
  static thread_local std::vector<Fiber> pool;
  return pool;
}
std::vector<std::unique_ptr<char[]>>& stack_pool() {
  static thread_local std::vector<std::unique_ptr<char[]>> pool;
  return pool;
}

void run_block(Block& blk, dim3 b, dim3 grid, dim3 block, int nthr, const std::function<void()>& body) {
  auto init_ctx = [&](Ctx& c, int t) {
    c.blk = &blk;
    c.bid = b;
    c.bdim = block;
    c.gdim = grid;
    c.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    c.lane = t % 32;
    c.warp = t / 32;
    c.groups.clear();
    c.open_group.clear();
    c.occurrences.clear();
  };
  if (fiber_mode()) {
    auto& stacks = stack_pool();
    while (int(stacks.size()) < nthr) stacks.emplace_back(new char[kStack]);
    auto& fs = fiber_pool();
    if (int(fs.size()) < nthr) fs.resize(nthr);
    const std::function<void()>* saved_body = t_body;
    t_body = &body;
    for (int t = 0; t < nthr; ++t) {
      Fiber& f = fs[t];
      init_ctx(f.c, t);
      f.done = false;
#if CUDASIM_FAST_SWITCH
      // Initial frame, as cudasim_switch leaves one: mxcsr/x87 control words, six callee-saved registers,
      // then the return address, placed so that fiber_main starts with the ABI's rsp = 8 (mod 16).
      auto top = reinterpret_cast<uintptr_t>(stacks[t].get() + kStack) & ~uintptr_t(15);
      auto* frame = reinterpret_cast<uint64_t*>(top - 16);
      frame[0] = reinterpret_cast<uint64_t>(&fiber_main);
      for (int r = 1; r <= 6; ++r) frame[-r] = 0;
      uint32_t words[2];
      asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(words[0]), "=m"(words[1]));
      std::memcpy(frame - 7, words, 8);
      f.sp = frame - 7;
#else
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = stacks[t].get();
      f.uc.uc_stack.ss_size = kStack;
      f.uc.uc_link = &t_sched;
      makecontext(&f.uc, fiber_main, 0);
#endif
    }
    int remaining = nthr;
    while (remaining) {
      const unsigned long before = g_progress;
      for (int t = 0; t < nthr; ++t) {
        Fiber& f = fs[t];
        if (f.done) continue;
        t_ctx = &f.c;
        t_fiber = &f;
#if CUDASIM_FAST_SWITCH
        cudasim_switch(&t_sched_sp, f.sp);
#else
        swapcontext(&t_sched, &f.uc);
#endif
        if (f.done) --remaining;
      }
      if (remaining && g_progress == before) fail("DEADLOCK: all remaining threads wait at barriers that cannot complete");
    }
    t_ctx = nullptr;
    t_fiber = nullptr;
    t_body = saved_body;
    return;
  }
  std::vector<Ctx> ctxs(nthr);
  std::vector<std::thread> ts;
  ts.reserve(nthr);
  for (int t = 0; t < nthr; ++t) {
    ts.emplace_back([&, t] {
      init_ctx(ctxs[t], t);
      t_ctx = &ctxs[t];
      body();
      thread_exit();
      t_ctx = nullptr;
    });
  }
  for (auto& th : ts) th.join();
}

bool is_edge(dim3 b, dim3 g) {
  auto edge = [](unsigned i, unsigned n) { return n > 1 && (i == 0 || i == n - 1); };
  return edge(b.x, g.x) || edge(b.y, g.y) || edge(b.z, g.z);
}

}  // namespace

void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int nthr = int(block.x * block.y * block.z);
  if (nthr <= 0 || nthr > 1024) fail("invalid block size");
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(dim3(x, y, z));
  if (const char* s = std::getenv("CUDASIM_SHUFFLE_BLOCKS")) {
    std::mt19937 g(std::atoi(s));
    std::shuffle(order.begin(), order.end(), g);
  }
  prof::refresh_static_ranges();  // a module loaded since the last launch has statics of its own
  std::unique_ptr<prof::Launch> launch = prof::begin_launch(name, grid, block, smem);
  if (launch != nullptr) {
    if (!fiber_mode()) fail("the counters need CUDASIM_MODE=fiber (the default)");
    std::vector<dim3> edges, interior;
    for (dim3 b : order) (is_edge(b, grid) ? edges : interior).push_back(b);
    launch->blocks_total = order.size();
    launch->blocks_edge_total = edges.size();
    if (launch->sample) {
      // Every edge block (partial tiles live there) plus a seeded random sample of the interior.
      std::mt19937_64 rng(launch->seed);
      std::shuffle(interior.begin(), interior.end(), rng);
      interior.resize(std::min(interior.size(), launch->interior_sample));
      order = edges;
      order.insert(order.end(), interior.begin(), interior.end());
    }
    g_launch = launch.get();
  }
  const auto t0 = std::chrono::steady_clock::now();
  const bool strict_exit = std::getenv("CUDASIM_STRICT_EXIT") != nullptr;
  for (dim3 b : order) {
    Block blk;
    blk.bar.reset(nthr, "__syncthreads", strict_exit);
    blk.dyn.assign(smem, 0xFF);  // poison: reading dynamic shared memory never written gives NaN
    const int nw = (nthr + 31) / 32;
    blk.warps = std::vector<Warp>(nw);
    for (int w = 0; w < nw; ++w) {
      const int n = std::min(32, nthr - 32 * w);
      Warp& warp = blk.warps[w];
      warp.bar.reset(n, "warp-collective op", true);
      warp.lanes = n;
      warp.launched_mask = n == 32 ? 0xffffffffu : ((1u << n) - 1);
      warp.live = warp.launched_mask;
    }
    if (g_launch != nullptr) g_launch->begin_block(is_edge(b, grid));
    run_block(blk, b, grid, block, nthr, body);
    if (g_launch != nullptr) {
      for (Warp& w : blk.warps) {  // instructions some lanes never reached (divergence, early exit)
        for (auto& [key, g] : w.groups.map) g_launch->cost(g);
        w.groups.map.clear();
      }
      g_launch->end_block();
    }
  }
  if (launch != nullptr) {
    g_launch = nullptr;
    launch->host_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    prof::end_launch(std::move(launch));
  }
}

// ---- pk::ptx primitives ----------------------------------------------------------------------------------------------------
namespace ptx {
namespace {

float b16_to_float(uint16_t v, bool half) {
  if (half) {
    __half_raw raw;
    raw.x = v;
    return __half2float(__half(raw));
  }
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t lo16(uint32_t r) { return uint16_t(r & 0xFFFF); }
uint16_t hi16(uint32_t r) { return uint16_t(r >> 16); }

struct MmaLane {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

// D = A·B + C for the warp, from the fragments as the PTX ISA lays them out (g = lane >> 2, t = lane & 3):
// A reg i of lane L: rows g (i = 0, 2) or g + 8 (i = 1, 3), columns 2t, 2t+1 (+8 for i >= 2);
// B reg i: rows 2t, 2t+1 (+8 for i = 1), column g; C/D element i: row g (i < 2) or g + 8, column 2t + (i & 1).
// The 16-bit products are exact in double and summed in double: within an ulp or two of any fp32 order.
template <bool half>
void mma_op(void* const* all, void*) {
  float A[16][16], B[16][8], C[16][8];
  for (int L = 0; L < 32; ++L) {
    const auto& m = *static_cast<const MmaLane*>(all[L]);
    const int g = L >> 2, t = L & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
      A[row][col] = b16_to_float(lo16(m.a[i]), half);
      A[row][col + 1] = b16_to_float(hi16(m.a[i]), half);
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = b16_to_float(lo16(m.b[i]), half);
      B[2 * t + 8 * i + 1][g] = b16_to_float(hi16(m.b[i]), half);
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = m.c[i];
  }
  float D[16][8];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      double s = C[r][n];
      for (int k = 0; k < 16; ++k) s += double(A[r][k]) * double(B[k][n]);
      D[r][n] = float(s);
    }
  for (int L = 0; L < 32; ++L) {  // after all lanes' C are read: d may alias c
    const auto& m = *static_cast<const MmaLane*>(all[L]);
    const int g = L >> 2, t = L & 3;
    for (int i = 0; i < 4; ++i) m.d[i] = D[g + 8 * (i >> 1)][2 * t + (i & 1)];
  }
  if (prof::Launch* L = prof::current()) {
    L->cur.mma += 1;
    L->cur.tensor_flops += 2.0 * 16 * 8 * 16;
  }
}

struct LdmLane {
  uint32_t* r;
  const void* smem;
};
struct LdmOp {
  int count;
  bool trans;
  Loc loc;
};

void ldmatrix_op(void* const* all, void* opp) {
  const auto& op = *static_cast<const LdmOp*>(opp);
  uint16_t M[4][8][8];
  uintptr_t rows[32];
  for (int j = 0; j < op.count; ++j)
    for (int r = 0; r < 8; ++r) {
      const auto a = reinterpret_cast<uintptr_t>(static_cast<const LdmLane*>(all[8 * j + r])->smem);
      if (a % 16 != 0) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "ldmatrix: lane %d's row address %p is not 16-byte aligned", 8 * j + r,
                      reinterpret_cast<void*>(a));
        fail_at(op.loc, msg);
      }
      if (!prof::is_shared(a, 16)) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "ldmatrix: lane %d's row address %p is not in shared memory", 8 * j + r,
                      reinterpret_cast<void*>(a));
        fail_at(op.loc, msg);
      }
      rows[8 * j + r] = a;
      std::memcpy(M[j][r], reinterpret_cast<const void*>(a), 16);
    }
  for (int L = 0; L < 32; ++L) {
    uint32_t* out = static_cast<const LdmLane*>(all[L])->r;
    const int g = L >> 2, t = L & 3;
    for (int j = 0; j < op.count; ++j) {
      const uint16_t e0 = op.trans ? M[j][2 * t][g] : M[j][g][2 * t];
      const uint16_t e1 = op.trans ? M[j][2 * t + 1][g] : M[j][g][2 * t + 1];
      out[j] = uint32_t(e0) | (uint32_t(e1) << 16);
    }
  }
  if (prof::Launch* L = prof::current()) L->cost_ldmatrix(rows, op.count);
}

}  // namespace

void mma_m16n8k16(bool half, float* d, const uint32_t* a, const uint32_t* b, const float* c, const Loc& loc) {
  MmaLane me{d, a, b, c};
  warp_instruction("mma.m16n8k16", &me, half ? mma_op<true> : mma_op<false>, nullptr, loc);
}

void ldmatrix(int count, bool trans, uint32_t* r, const void* smem, const Loc& loc) {
  LdmLane me{r, smem};
  LdmOp op{count, trans, loc};
  warp_instruction("ldmatrix", &me, ldmatrix_op, &op, loc);
}

void cp_async_16(void* smem, const void* gmem, int src_bytes, const Loc& loc) {
  const auto s = reinterpret_cast<uintptr_t>(smem), g = reinterpret_cast<uintptr_t>(gmem);
  if (s % 16 != 0 || (src_bytes > 0 && g % 16 != 0)) {
    char msg[200];
    std::snprintf(msg, sizeof msg, "cp.async 16: addresses must be 16-byte aligned (shared %p, global %p)", smem, gmem);
    fail_at(loc, msg);
  }
  if (src_bytes < 0 || src_bytes > 16) fail_at(loc, "cp.async 16: src_bytes must be in [0, 16]");
  if (!prof::is_shared(s, 16)) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "cp.async 16: destination %p is not in shared memory", smem);
    fail_at(loc, msg);
  }
  PendingCopy c{static_cast<unsigned char*>(smem), {}};
  if (src_bytes > 0) std::memcpy(c.data, gmem, size_t(src_bytes));
  std::memset(c.data + src_bytes, 0, size_t(16 - src_bytes));
  std::memset(smem, 0xFF, 16);  // poison until waited on: a read before the wait computes NaN
  ctx().open_group.push_back(c);
  const uint64_t pc = reinterpret_cast<uint64_t>(loc.file_name()) * 1000003u + uint64_t(loc.line()) * 4099u + loc.column();
  if (src_bytes > 0) prof::access(pc, gmem, size_t(src_bytes), false);
  prof::access(pc ^ 1, smem, 16, true);
  if (prof::Launch* L = prof::current()) L->cur.cp_async_bytes += src_bytes;
}

void cp_async_commit(const Loc&) {
  ctx().groups.push_back(std::move(ctx().open_group));
  ctx().open_group.clear();
}

void cp_async_wait(int n, const Loc&) {
  auto& groups = ctx().groups;
  while (int(groups.size()) > n) {
    for (const PendingCopy& c : groups.front()) std::memcpy(c.dst, c.data, 16);
    groups.erase(groups.begin());
  }
}

}  // namespace ptx
}  // namespace cudasim

namespace cudasim {
std::map<const void*, int>& smem_opt_in() {
  static std::map<const void*, int> m;
  return m;
}

void check_smem_opt_in(const void* kernel, const char* name, size_t smem) {
  if (smem <= 48 * 1024) return;
  int allowed = 0;
  {
    std::lock_guard<std::mutex> lk(g_alloc_mutex);
    const auto it = smem_opt_in().find(kernel);
    if (it != smem_opt_in().end()) allowed = it->second;
  }
  if (size_t(allowed) < smem) {
    char msg[256];
    std::snprintf(msg, sizeof msg, "%s: %zu bytes of dynamic shared memory need cudaFuncSetAttribute("
                  "MaxDynamicSharedMemorySize) first (set: %d)", name, smem, allowed);
    fail(msg);
  }
}
}  // namespace cudasim

// ---- cudart entry points --------------------------------------------------------------------------------------------------
// Host memory stands in for device memory; every launch has completed when KLAUNCH returns.
extern "C" {
// Fresh "device" memory is 0xFF-filled (NaN as float) so a kernel that reads what it never wrote shows it.
cudaError_t cudaMalloc(void** p, size_t n) {
  // 256-byte aligned like cudaMalloc's, so sector and bank arithmetic matches the GPU's; exactly n bytes, so
  // AddressSanitizer sees a kernel that runs past the end (test_cudasim.py's off-by-one mutants)
  if (posix_memalign(p, 256, n ? n : 1) != 0) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xFF, n);
  std::lock_guard<std::mutex> lk(cudasim::g_alloc_mutex);
  cudasim::allocations()[reinterpret_cast<uintptr_t>(*p)] = n ? n : 1;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  {
    std::lock_guard<std::mutex> lk(cudasim::g_alloc_mutex);
    cudasim::allocations().erase(reinterpret_cast<uintptr_t>(p));
    cudasim::labels().erase(reinterpret_cast<uintptr_t>(p));
  }
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* d, int v, size_t n) {
  std::memset(d, v, n);
  return cudaSuccess;
}
// Dynamic shared memory above 48 KiB must be opted into per kernel, as on the GPU (where the launch fails
// otherwise); 227 KiB is sm_90's per-block maximum (sm_80: 163 KiB).
cudaError_t cudaFuncSetAttribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(cudasim::g_alloc_mutex);
  cudasim::smem_opt_in()[fn] = value;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "cudasim error"; }
}
