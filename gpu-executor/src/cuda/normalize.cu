// mmgate_normalize_u8: the last preprocessing stage on the GPU. It turns a
// batch of 8-bit images into the model's float input, the device twin of
// preprocess-worker/src/normalize.rs.
//
// The Rust side embeds this file with include_str! and compiles it at run
// time with NVRTC (cudarc::nvrtc), so it must stay self-contained: NVRTC has
// no standard headers, hence no #include.
//
// Input  src: `samples` images back to back, each height x width x 3 bytes,
//             interleaved (HWC) in the source's channel order.
// Output dst: samples x 3 x height x width floats,
//             nchw == 0: NHWC, index ((s*H + y)*W + x)*3 + c
//             nchw == 1: NCHW, index ((s*3 + c)*H + y)*W + x
// Output channel c reads source channel pick_c (0, 1 or 2; RGB->BGR is
// 2, 1, 0) and is (float(v) * scale - mean_c) / std_c.
//
// Bit-exactness with the CPU's plain f32 `(v as f32 * scale - mean) / std`:
// every step is an explicitly rounded intrinsic (__fmul_rn, __fsub_rn,
// __fdiv_rn), so the compiler can neither contract the multiply and subtract
// into an FMA nor use an approximate division. Do not compile with
// --use_fast_math or -ftz=true (denormal results would be flushed to zero).
//
// One thread per output element in a grid-stride loop; any grid size is
// correct. Indices are 64-bit. A pick outside 0..2 makes the kernel write
// nothing (the host validates picks; this only keeps reads in bounds).

extern "C" __global__ void mmgate_normalize_u8(
    const unsigned char* src, float* dst, unsigned int samples,
    unsigned int height, unsigned int width, int nchw,
    int pick0, int pick1, int pick2, float scale,
    float mean0, float mean1, float mean2,
    float std0, float std1, float std2)
{
    if ((unsigned int)pick0 > 2u || (unsigned int)pick1 > 2u || (unsigned int)pick2 > 2u) {
        return;
    }
    const unsigned long long h = height;
    const unsigned long long w = width;
    const unsigned long long total = (unsigned long long)samples * 3ull * h * w;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;

    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += stride) {
        unsigned long long s, y, x, c, rest;
        if (nchw) {
            x = i % w;
            rest = i / w;
            y = rest % h;
            rest /= h;
            c = rest % 3ull;
            s = rest / 3ull;
        } else {
            c = i % 3ull;
            rest = i / 3ull;
            x = rest % w;
            rest /= w;
            y = rest % h;
            s = rest / h;
        }
        const int pick = c == 0 ? pick0 : (c == 1 ? pick1 : pick2);
        const float mean = c == 0 ? mean0 : (c == 1 ? mean1 : mean2);
        const float sd = c == 0 ? std0 : (c == 1 ? std1 : std2);

        const unsigned char v = src[((s * h + y) * w + x) * 3ull + (unsigned long long)pick];
        dst[i] = __fdiv_rn(__fsub_rn(__fmul_rn((float)v, scale), mean), sd);
    }
}
