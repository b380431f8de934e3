// Helpers shared by every kernel; prepended to each specialisation's header after its
// constants (HEAD_DIM, KV_FP8, q_t, kv_t, ...). Plain functions, no templates over
// address spaces, so the same text compiles as MSL and under the emulator shim.

// float8 e4m3fn (bias 7, no infinities, 0x7f/0xff = NaN, max 448). Metal has no fp8
// type, so the byte is decoded with integer ops.
inline float e4m3_to_float(uchar b) {
  uint e = (uint(b) >> 3) & 0xfu;
  uint m = uint(b) & 0x7u;
  float mag;
  if (e == 0u) {
    mag = float(m) * 0.001953125f;                      // subnormal: m * 2^-9
  } else if (e == 15u && m == 7u) {
    mag = NAN;
  } else {
    mag = as_type<float>(((e + 120u) << 23) | (m << 20));  // rebias 7 -> 127
  }
  return (b & 0x80) ? -mag : mag;
}

// Round to nearest even; the caller saturates to +-448 first, so no overflow to NaN.
inline uchar float_to_e4m3(float x) {
  uint bits = as_type<uint>(x);
  uchar sign = uchar((bits >> 24) & 0x80u);
  if (isnan(x)) return uchar(sign | 0x7fu);
  float a = fabs(x);
  if (a < 0.015625f) {                                   // below 2^-6: subnormal grid 2^-9
    return uchar(sign | uchar(rint(a * 512.0f)));        // 8 rounds up to the min normal 0x08
  }
  uint ab = as_type<uint>(a);
  ab += 0x7ffffu + ((ab >> 20) & 1u);                    // RNE on the 20 dropped bits
  uint e = (ab >> 23) - 120u;
  uint m = (ab >> 20) & 7u;
  return uchar(sign | uchar((e << 3) | m));
}

// erf for f32 (Metal's stdlib has none): the rational approximation XLA and Eigen use,
// accurate to a few ulp on [-4, 4] and saturated outside.
inline float erf_f32(float x) {
  x = clamp(x, -4.0f, 4.0f);
  float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  p = x * p;
  float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return p / q;
}
