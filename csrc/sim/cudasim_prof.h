// The executor's counters (included by cudasim_rt.cpp only): what one launch of a kernel costs, collected from
// every memory access of every warp. A warp's access is the lanes' addresses of one instruction: the n-th
// execution of an instruction by each lane (SIMT lanes run an instruction together; a lane that skipped it
// simply is not among them).
//
// Enabled by CUDASIM_PROFILE=FILE (one JSON line per launch appended to FILE) and fiber mode. Plain loads and
// stores reach access() only in builds whose kernel code is compiled with -fsanitize=thread and linked with
// cudasim_count.cpp instead of the ThreadSanitizer runtime; mma, ldmatrix and cp.async are counted always.
//
//   CUDASIM_SAMPLE=auto (default): grids of more than CUDASIM_EXACT_BLOCKS blocks (default 512) run every
//     edge block (partial tiles live there) and 8 seeded random interior blocks; interior counters are scaled
//     by interior blocks / interior blocks run. =exact: every block. =N: sample with N interior blocks.
//   CUDASIM_SEED: the interior sample's seed (default 0).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <cuda_runtime.h>

namespace cudasim::prof {

enum class Space : uint8_t { kGlobal, kShared };

struct GroupKey {
  uint64_t pc;
  uint32_t occurrence;
  bool operator==(const GroupKey& o) const { return pc == o.pc && occurrence == o.occurrence; }
};
struct GroupKeyHash {
  size_t operator()(const GroupKey& k) const { return std::hash<uint64_t>()(k.pc * 0x9E3779B97F4A7C15ull + k.occurrence); }
};

// One warp instruction's lane accesses, filled as the lanes execute it.
struct Group {
  int n = 0;
  Space space = Space::kGlobal;
  bool write = false;
  uint8_t lane[32];
  uintptr_t addr[32];
  uint32_t size[32];
};
struct WarpGroups {
  std::unordered_map<GroupKey, Group, GroupKeyHash> map;
};

struct Sums {
  double gld_requests = 0, gld_sectors = 0, gld_ideal = 0;  // global loads: warp instructions, sectors, minimum
  double gst_requests = 0, gst_sectors = 0, gst_ideal = 0;  // global stores
  double smem_requests = 0, smem_wavefronts = 0, smem_ideal = 0;  // shared loads/stores, incl. cp.async's store
  double ldmatrix = 0, ldsm_wavefronts = 0, ldsm_ideal = 0;
  double mma = 0, tensor_flops = 0, flops = 0, cp_async_bytes = 0;
  void add(const Sums& o, double s) {
    gld_requests += s * o.gld_requests, gld_sectors += s * o.gld_sectors, gld_ideal += s * o.gld_ideal;
    gst_requests += s * o.gst_requests, gst_sectors += s * o.gst_sectors, gst_ideal += s * o.gst_ideal;
    smem_requests += s * o.smem_requests, smem_wavefronts += s * o.smem_wavefronts, smem_ideal += s * o.smem_ideal;
    ldmatrix += s * o.ldmatrix, ldsm_wavefronts += s * o.ldsm_wavefronts, ldsm_ideal += s * o.ldsm_ideal;
    mma += s * o.mma, tensor_flops += s * o.tensor_flops, flops += s * o.flops, cp_async_bytes += s * o.cp_async_bytes;
  }
};

// Distinct 32-byte sectors of one cudaMalloc'd buffer, read and written counted apart (an in-place update
// reads and writes each sector once): the DRAM proxy (it ignores L2 capacity: a lower bound).
struct Buffer {
  size_t bytes = 0;
  std::vector<uint32_t> last_block;  // per sector and direction (2s: read, 2s+1: written): the serial of the last
                                     // block that touched it (0: none)
  // per direction (0: read, 1: written)
  uint64_t unique[2] = {}, block_new[2] = {}, lo[2] = {UINT64_MAX, UINT64_MAX}, hi[2] = {};
  double edge_new[2] = {}, interior_new[2] = {};  // per-block distinct sectors, summed by stratum
  // The global requests, sectors and minimum sectors of the warp instructions whose first lane addressed this
  // buffer (its sector efficiency): the running block's, and completed blocks' by stratum.
  Sums cur, edge, interior;
};

const std::pair<const uintptr_t, size_t>* find_allocation(uintptr_t a);
bool is_shared(uintptr_t a, size_t n);
std::string label_of(uintptr_t base);  // the name cudasim::label_buffer gave the buffer at base, or ""

inline void add_global(Sums& s, bool write, double sectors, double ideal) {
  if (write) {
    s.gst_requests += 1, s.gst_sectors += sectors, s.gst_ideal += ideal;
  } else {
    s.gld_requests += 1, s.gld_sectors += sectors, s.gld_ideal += ideal;
  }
}

// The largest number of distinct 4-byte words in one bank: the wavefronts one phase of a shared access takes.
inline int wavefronts(const uintptr_t* addr, const uint32_t* size, int n) {
  uint64_t words[128];
  int w = 0;
  for (int i = 0; i < n; ++i)
    for (uintptr_t a = addr[i] >> 2; a <= (addr[i] + size[i] - 1) >> 2 && w < 128; ++a) words[w++] = a;
  std::sort(words, words + w);
  w = int(std::unique(words, words + w) - words);
  int per_bank[32] = {};
  int most = 0;
  for (int i = 0; i < w; ++i) most = std::max(most, ++per_bank[words[i] & 31]);
  return most;
}

struct Launch {
  std::string name, path;
  dim3 grid, threads;
  size_t dyn_smem = 0;
  bool sample = false;
  size_t interior_sample = 8;
  uint64_t seed = 0;
  uint64_t blocks_total = 0, blocks_edge_total = 0, blocks_edge_run = 0, blocks_interior_run = 0;
  double host_seconds = 0;
  Sums cur, edge, interior;  // the running block's counters; completed blocks by stratum
  bool block_is_edge = false;
  uint32_t serial = 0;
  std::map<uintptr_t, Buffer> buffers;
  std::vector<Buffer*> touched;  // buffers the running block touched

  void begin_block(bool is_edge) {
    cur = Sums{};
    block_is_edge = is_edge;
    ++serial;
    touched.clear();
  }
  void end_block() {
    (block_is_edge ? edge : interior).add(cur, 1.0);
    (block_is_edge ? blocks_edge_run : blocks_interior_run) += 1;
    for (Buffer* b : touched) {
      for (int w = 0; w < 2; ++w) {
        (block_is_edge ? b->edge_new : b->interior_new)[w] += double(b->block_new[w]);
        b->block_new[w] = 0;
      }
      (block_is_edge ? b->edge : b->interior).add(b->cur, 1.0);
      b->cur = Sums{};
    }
  }

  void touch_sector(uintptr_t sector_addr, bool write) {
    const auto* alloc = find_allocation(sector_addr);
    if (alloc == nullptr) return;
    Buffer& b = buffers[alloc->first];
    if (b.last_block.empty()) {
      b.bytes = alloc->second;
      b.last_block.assign(2 * ((alloc->second + 31) / 32), 0);
    }
    const uint64_t s = (sector_addr - alloc->first) >> 5;
    if (2 * s + 1 >= b.last_block.size()) return;
    uint32_t& last = b.last_block[2 * s + write];
    if (last == serial) return;
    if (last == 0) ++b.unique[write];
    if (b.block_new[0] + b.block_new[1] == 0) touched.push_back(&b);
    last = serial;
    ++b.block_new[write];
    b.lo[write] = std::min(b.lo[write], s);
    b.hi[write] = std::max(b.hi[write], s);
  }

  void cost(const Group& g) {
    if (g.n == 0) return;
    if (g.space == Space::kGlobal) {
      uint64_t sectors[64];
      int ns = 0;
      std::pair<uintptr_t, uintptr_t> spans[32];
      for (int i = 0; i < g.n; ++i) {
        spans[i] = {g.addr[i], g.addr[i] + g.size[i]};
        for (uintptr_t s = g.addr[i] >> 5; s <= (g.addr[i] + g.size[i] - 1) >> 5 && ns < 64; ++s) sectors[ns++] = s;
      }
      std::sort(sectors, sectors + ns);
      ns = int(std::unique(sectors, sectors + ns) - sectors);
      std::sort(spans, spans + g.n);
      uint64_t bytes = 0;
      uintptr_t end = 0;
      for (int i = 0; i < g.n; ++i) {
        const uintptr_t lo = std::max(spans[i].first, end);
        if (spans[i].second > lo) bytes += spans[i].second - lo;
        end = std::max(end, spans[i].second);
      }
      const double ideal = double((bytes + 31) / 32);
      add_global(cur, g.write, ns, ideal);
      for (int i = 0; i < ns; ++i) touch_sector(uintptr_t(sectors[i]) << 5, g.write);
      // touch_sector listed the buffer among the block's (its first sector in a block is always new to it)
      if (const auto* alloc = find_allocation(g.addr[0])) add_global(buffers[alloc->first].cur, g.write, ns, ideal);
      return;
    }
    // Shared: 4-byte (or narrower) accesses take the warp in one phase, 8-byte ones in half-warps, 16-byte
    // ones in quarter-warps (128 bytes a phase), phases by lane index.
    uint32_t widest = 0;
    for (int i = 0; i < g.n; ++i) widest = std::max(widest, g.size[i]);
    const int lanes_per_phase = widest <= 4 ? 32 : widest <= 8 ? 16 : 8;
    cur.smem_requests += 1;
    for (int p = 0; p < 32 / lanes_per_phase; ++p) {
      uintptr_t a[32];
      uint32_t s[32];
      int n = 0;
      for (int i = 0; i < g.n; ++i)
        if (g.lane[i] / lanes_per_phase == p) a[n] = g.addr[i], s[n] = g.size[i], ++n;
      if (n == 0) continue;
      cur.smem_wavefronts += wavefronts(a, s, n);
      cur.smem_ideal += 1;
    }
  }

  // An ldmatrix of `count` 8x8 matrices: one phase per matrix, its 8 row addresses of 16 bytes.
  void cost_ldmatrix(const uintptr_t* rows, int count) {
    cur.ldmatrix += 1;
    const uint32_t sizes[8] = {16, 16, 16, 16, 16, 16, 16, 16};
    for (int j = 0; j < count; ++j) {
      cur.ldsm_wavefronts += wavefronts(rows + 8 * j, sizes, 8);
      cur.ldsm_ideal += 1;
    }
  }

  // A buffer's distinct sectors, read and written counted apart; sampled, the interior blocks' new sectors scaled,
  // capped by the span the sample touched.
  double distinct_sectors(const Buffer& b, double scale) const {
    double sectors = 0;
    for (int w = 0; w < 2; ++w) {
      if (!sample) {
        sectors += double(b.unique[w]);
      } else {
        const double span = b.hi[w] >= b.lo[w] ? double(b.hi[w] - b.lo[w] + 1) : 0.0;
        sectors += std::min(b.edge_new[w] + scale * b.interior_new[w], span);
      }
    }
    return sectors;
  }

  // The launch's totals (interior blocks scaled when sampled) as one JSON object.
  std::string json() const {
    const uint64_t interior_total = blocks_total - blocks_edge_total;
    const double scale = blocks_interior_run ? double(interior_total) / double(blocks_interior_run) : 0.0;
    Sums t = edge;
    t.add(interior, scale);
    double dram_sectors = 0;
    for (const auto& [base, b] : buffers) dram_sectors += distinct_sectors(b, scale);
    std::string out;
    char buf[256];
    out = "{\"kernel\": \"";
    for (char c : name) out += (c == '"' || c == '\\') ? '_' : c;
    std::snprintf(buf, sizeof buf, "\", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], \"sampled\": %s", grid.x,
                  grid.y, grid.z, threads.x, threads.y, threads.z, sample ? "true" : "false");
    out += buf;
    const std::pair<const char*, double> fields[] = {
        {"dyn_smem", double(dyn_smem)}, {"blocks", double(blocks_total)},
        {"blocks_run", double(blocks_edge_run + blocks_interior_run)},
        {"global_load_requests", t.gld_requests}, {"global_load_sectors", t.gld_sectors},
        {"global_load_min_sectors", t.gld_ideal}, {"global_store_requests", t.gst_requests},
        {"global_store_sectors", t.gst_sectors}, {"global_store_min_sectors", t.gst_ideal},
        {"dram_bytes", 32.0 * dram_sectors}, {"shared_requests", t.smem_requests},
        {"shared_wavefronts", t.smem_wavefronts}, {"shared_min_wavefronts", t.smem_ideal},
        {"ldmatrix", t.ldmatrix}, {"ldmatrix_wavefronts", t.ldsm_wavefronts},
        {"ldmatrix_min_wavefronts", t.ldsm_ideal}, {"mma", t.mma}, {"tensor_flops", t.tensor_flops},
        {"flops", t.flops}, {"cp_async_bytes", t.cp_async_bytes}, {"host_seconds", host_seconds}};
    for (const auto& [k, v] : fields) {
      std::snprintf(buf, sizeof buf, ", \"%s\": %.17g", k, v);
      out += buf;
    }
    // Per buffer: its name, size, global traffic (scaled like the totals) and DRAM proxy.
    out += ", \"buffers\": [";
    bool first = true;
    for (const auto& [base, b] : buffers) {
      Sums bt = b.edge;
      bt.add(b.interior, scale);
      out += first ? "{\"name\": \"" : ", {\"name\": \"";
      first = false;
      for (char c : label_of(base)) out += (c == '"' || c == '\\') ? '_' : c;
      std::snprintf(buf, sizeof buf, "\", \"bytes\": %zu", b.bytes);
      out += buf;
      const std::pair<const char*, double> per[] = {
          {"load_requests", bt.gld_requests}, {"load_sectors", bt.gld_sectors}, {"load_min_sectors", bt.gld_ideal},
          {"store_requests", bt.gst_requests}, {"store_sectors", bt.gst_sectors},
          {"store_min_sectors", bt.gst_ideal}, {"dram_bytes", 32.0 * distinct_sectors(b, scale)}};
      for (const auto& [k, v] : per) {
        std::snprintf(buf, sizeof buf, ", \"%s\": %.17g", k, v);
        out += buf;
      }
      out += "}";
    }
    return out + "]}";
  }
};

Launch* current();
void access(uint64_t pc, const void* p, size_t n, bool write);
void refresh_static_ranges();

inline std::unique_ptr<Launch> begin_launch(const char* name, dim3 grid, dim3 block, size_t smem) {
  const char* path = std::getenv("CUDASIM_PROFILE");
  if (path == nullptr || *path == 0) return nullptr;
  auto L = std::make_unique<Launch>();
  L->name = name;
  L->path = path;
  L->grid = grid;
  L->threads = block;
  L->dyn_smem = smem;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const char* mode = std::getenv("CUDASIM_SAMPLE");
  const char* exact_max = std::getenv("CUDASIM_EXACT_BLOCKS");
  const uint64_t limit = exact_max ? std::strtoull(exact_max, nullptr, 10) : 512;
  if (mode == nullptr || std::strcmp(mode, "auto") == 0) {
    L->sample = blocks > limit;
  } else if (std::strcmp(mode, "exact") != 0) {
    L->sample = true;
    L->interior_sample = std::max<size_t>(8, std::strtoull(mode, nullptr, 10));
  }
  if (const char* s = std::getenv("CUDASIM_SEED")) L->seed = std::strtoull(s, nullptr, 10);
  return L;
}

inline void end_launch(std::unique_ptr<Launch> L) {
  std::FILE* f = std::fopen(L->path.c_str(), "a");
  if (f == nullptr) {
    std::fprintf(stderr, "cudasim: cannot append to CUDASIM_PROFILE=%s\n", L->path.c_str());
    std::abort();
  }
  std::fprintf(f, "%s\n", L->json().c_str());
  std::fclose(f);
}

}  // namespace cudasim::prof
