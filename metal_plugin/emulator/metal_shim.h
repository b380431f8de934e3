// Metal Shading Language shim: lets MSL kernel bodies compile as C++20 and run on the CPU.
// Each threadgroup runs on real threads (runtime.h); simd_* collectives exchange values
// through a per-simdgroup slot array between two real barriers, so a kernel that lets
// lanes diverge around a collective deadlocks here as it would misbehave on a GPU.
// Limits: accepts some C++ Metal rejects; no threadgroup-memory size or pipeline limits;
// precise math; says nothing about speed.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <condition_variable>
#include <mutex>

namespace emu {

// A reusable barrier on pthread primitives (ThreadSanitizer models these exactly).
class Barrier {
 public:
  void init(unsigned n) { n_ = n; waiting_ = 0; gen_ = 0; }
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    unsigned gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen != gen_; });
    }
  }
 private:
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned n_ = 1, waiting_ = 0, gen_ = 0;
};

struct SimdGroup {
  Barrier bar;
  unsigned width = 32;
  alignas(8) unsigned char slots[32 * 8];
};

struct ThreadCtx {
  SimdGroup* sg = nullptr;
  Barrier* tg_bar = nullptr;
  unsigned lane = 0;
};
inline thread_local ThreadCtx tctx;

}  // namespace emu

namespace metal {
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;

// bfloat16 as a class (g++ 12 has no __bf16): float conversion rounds to nearest even,
// arithmetic happens in float, as on Apple GPUs.
struct bfloat {
  uint16_t bits = 0;
  bfloat() = default;
  bfloat(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  bfloat(double d) : bfloat(float(d)) {}
  bfloat(int i) : bfloat(float(i)) {}
  bfloat(half h) : bfloat(float(h)) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct uint3 { uint x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

template <class To, class From>
inline To as_type(From f) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float abs(float x) { return std::fabs(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float rint(float x) { return std::nearbyint(x); }
inline float floor(float x) { return std::floor(x); }
inline float ceil(float x) { return std::ceil(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float precise_tanh(float x) { return std::tanh(x); }
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float log(float x) { return std::log(x); }
}  // namespace precise
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float tanh(float x) { return std::tanh(x); }
}  // namespace fast

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

inline void threadgroup_barrier(mem_flags) { emu::tctx.tg_bar->wait(); }
inline void simdgroup_barrier(mem_flags) { emu::tctx.sg->bar.wait(); }

// Collectives: write own slot, barrier, read, barrier (so the next collective cannot
// overwrite a slot another lane has not read yet). Reductions read in lane order, so
// every lane gets the identical result, as on hardware.
template <class T>
inline T* simd_slots_() { return reinterpret_cast<T*>(emu::tctx.sg->slots); }
template <class T>
inline T simd_sum(T x) {
  auto& c = emu::tctx;
  simd_slots_<T>()[c.lane] = x;
  c.sg->bar.wait();
  T s = T(0);
  for (unsigned i = 0; i < c.sg->width; ++i) s += simd_slots_<T>()[i];
  c.sg->bar.wait();
  return s;
}
template <class T>
inline T simd_max(T x) {
  auto& c = emu::tctx;
  simd_slots_<T>()[c.lane] = x;
  c.sg->bar.wait();
  T s = simd_slots_<T>()[0];
  for (unsigned i = 1; i < c.sg->width; ++i) s = max(s, simd_slots_<T>()[i]);
  c.sg->bar.wait();
  return s;
}
template <class T>
inline T simd_min(T x) {
  auto& c = emu::tctx;
  simd_slots_<T>()[c.lane] = x;
  c.sg->bar.wait();
  T s = simd_slots_<T>()[0];
  for (unsigned i = 1; i < c.sg->width; ++i) s = min(s, simd_slots_<T>()[i]);
  c.sg->bar.wait();
  return s;
}
template <class T>
inline T simd_shuffle(T x, ushort src) {
  auto& c = emu::tctx;
  simd_slots_<T>()[c.lane] = x;
  c.sg->bar.wait();
  T s = simd_slots_<T>()[src % c.sg->width];
  c.sg->bar.wait();
  return s;
}
template <class T>
inline T simd_shuffle_xor(T x, ushort mask) {
  return simd_shuffle(x, ushort((emu::tctx.lane ^ mask)));
}
template <class T>
inline T simd_broadcast(T x, ushort src) { return simd_shuffle(x, src); }
}  // namespace metal

using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;

