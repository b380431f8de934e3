// Launch runtime of the emulator: one OS thread per Metal thread of a threadgroup.
// Threadgroups run one after another on the same thread pool (threadgroup memory is a
// function static, see metal_shim.h); each thread gets its Metal position attributes.
#pragma once
#include <thread>
#include <vector>
#include "metal_shim.h"

namespace emu {

struct Attrs {
  metal::uint3 thread_position_in_grid, threadgroup_position_in_grid,
      thread_position_in_threadgroup, threads_per_threadgroup, threadgroups_per_grid,
      grid_size;
  unsigned thread_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroup_index_in_threadgroup, simdgroups_per_threadgroup, threads_per_simdgroup;
};

using Thunk = void (*)(void** buffers, const Attrs& a);

// Returns 0 on success, 1 if the grid is not a whole number of threadgroups, 2 if the
// threadgroup is empty or over 1024 threads (Metal's limit).
inline int launch(Thunk fn, void** buffers, const uint32_t* grid, const uint32_t* tg) {
  for (int i = 0; i < 3; ++i)
    if (tg[i] == 0 || grid[i] % tg[i] != 0) return 1;
  const unsigned n = tg[0] * tg[1] * tg[2];
  if (n > 1024) return 2;
  const unsigned ngx = grid[0] / tg[0], ngy = grid[1] / tg[1], ngz = grid[2] / tg[2];
  const unsigned nsg = (n + 31) / 32;
  std::vector<SimdGroup> sgs(nsg);
  for (unsigned g = 0; g < nsg; ++g) {
    sgs[g].width = (g + 1) * 32 <= n ? 32 : n - g * 32;
    sgs[g].bar.init(sgs[g].width);
  }
  Barrier tg_bar;
  tg_bar.init(n);
  auto worker = [&](unsigned tid) {
    tctx.sg = &sgs[tid / 32];
    tctx.lane = tid % 32;
    tctx.tg_bar = &tg_bar;
    Attrs a{};
    a.thread_position_in_threadgroup = {tid % tg[0], (tid / tg[0]) % tg[1], tid / (tg[0] * tg[1])};
    a.threads_per_threadgroup = {tg[0], tg[1], tg[2]};
    a.threadgroups_per_grid = {ngx, ngy, ngz};
    a.grid_size = {grid[0], grid[1], grid[2]};
    a.thread_index_in_threadgroup = tid;
    a.thread_index_in_simdgroup = tid % 32;
    a.simdgroup_index_in_threadgroup = tid / 32;
    a.simdgroups_per_threadgroup = nsg;
    a.threads_per_simdgroup = 32;
    for (unsigned gz = 0; gz < ngz; ++gz)
      for (unsigned gy = 0; gy < ngy; ++gy)
        for (unsigned gx = 0; gx < ngx; ++gx) {
          a.threadgroup_position_in_grid = {gx, gy, gz};
          const auto& p = a.thread_position_in_threadgroup;
          a.thread_position_in_grid = {gx * tg[0] + p.x, gy * tg[1] + p.y, gz * tg[2] + p.z};
          fn(buffers, a);
          // The next threadgroup reuses threadgroup memory: all threads must be done.
          tg_bar.wait();
        }
  };
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
  return 0;
}

}  // namespace emu

// Address-space words, after all runtime code (`thread` would break std::thread above).
// `threadgroup` declarations in a kernel body become function statics: one copy shared
// by the threads of the running threadgroup (the runtime runs one threadgroup at a time).
#define device
#define constant
#define thread
#define threadgroup static
#define kernel
