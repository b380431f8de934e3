// Stand-alone driver for sanitizer runs: links one kernel translation unit (emu_launch)
// and runs it on buffers from files, each in its own exactly-sized heap allocation so
// AddressSanitizer sees any read or write past a buffer.
// argv: gx gy gz tx ty tz then "in:PATH:BYTES" / "out:PATH:BYTES" per buffer, in order.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern "C" int emu_launch(void** buffers, const unsigned* grid, const unsigned* tg);

int main(int argc, char** argv) {
  if (argc < 7) return 64;
  unsigned grid[3], tg[3];
  for (int i = 0; i < 3; ++i) grid[i] = unsigned(std::atoi(argv[1 + i]));
  for (int i = 0; i < 3; ++i) tg[i] = unsigned(std::atoi(argv[4 + i]));
  std::vector<void*> bufs;
  std::vector<std::pair<std::string, size_t>> outs;
  std::vector<size_t> out_idx;
  for (int a = 7; a < argc; ++a) {
    std::string s = argv[a];
    size_t c1 = s.find(':'), c2 = s.rfind(':');
    std::string kind = s.substr(0, c1), path = s.substr(c1 + 1, c2 - c1 - 1);
    size_t n = std::strtoull(s.c_str() + c2 + 1, nullptr, 10);
    void* p = std::malloc(n ? n : 1);
    if (kind == "in") {
      FILE* f = std::fopen(path.c_str(), "rb");
      if (!f || std::fread(p, 1, n, f) != n) return 65;
      std::fclose(f);
    } else {
      std::memset(p, 0xff, n);  // outputs arrive uninitialised: poison them (NaN / -1)
      outs.push_back({path, n});
      out_idx.push_back(bufs.size());
    }
    bufs.push_back(p);
  }
  int rc = emu_launch(bufs.data(), grid, tg);
  if (rc != 0) return 66;
  for (size_t i = 0; i < outs.size(); ++i) {
    FILE* f = std::fopen(outs[i].first.c_str(), "wb");
    if (!f) return 67;
    std::fwrite(bufs[out_idx[i]], 1, outs[i].second, f);
    std::fclose(f);
  }
  for (void* p : bufs) std::free(p);
  return 0;
}
