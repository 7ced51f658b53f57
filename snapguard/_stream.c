/* snapguard._stream: copy bulk bytes with non-temporal (streaming) stores.
 *
 * A snapshot copies the whole training state into a shared-memory slot that this process will not read
 * again. An ordinary copy (glibc's memmove, below its 240 MiB non-temporal threshold on the dev VM)
 * first reads every destination line into the cache, then writes it back: three passes over memory for
 * one copy, and the slot's bytes push training's working set out of the cache. Streaming stores write
 * the destination without reading it and without keeping it cached: two passes. The loads stay
 * ordinary, so the source is still in the cache right after a piece is copied (the caller hashes it
 * there).
 *
 * copy(dst, src, n) takes addresses as ints, releases the GIL, and returns nothing; kind() names the
 * instructions chosen for this CPU: "avx2", "sse2", or "memcpy" where there are no streaming stores.
 * kinds() lists every kind this CPU runs, and copy(dst, src, n, kind) uses one of them (for the tests).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SNAPGUARD_X86 1
#endif

/* Below this, an ordinary copy: streaming stores pay off only once a copy is much larger than a cache line. */
#define STREAM_MIN 4096

typedef void (*copy_fn)(char *dst, const char *src, size_t n);

static void copy_plain(char *dst, const char *src, size_t n) { memmove(dst, src, n); }

#ifdef SNAPGUARD_X86
/* The destination is aligned to 64 bytes with an ordinary copy of the first bytes; each loop stores whole
 * 64-byte lines, and the rest is copied ordinarily. The fence orders the streaming stores before anything the
 * caller does next (a seal that tells another process the bytes are there). */
__attribute__((target("avx2"))) static void copy_avx2(char *dst, const char *src, size_t n) {
    size_t head = (64 - ((uintptr_t)dst & 63)) & 63, i;
    memcpy(dst, src, head);
    for (i = head; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(src + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(src + i + 96));
        _mm256_stream_si256((__m256i *)(dst + i), a);
        _mm256_stream_si256((__m256i *)(dst + i + 32), b);
        _mm256_stream_si256((__m256i *)(dst + i + 64), c);
        _mm256_stream_si256((__m256i *)(dst + i + 96), d);
    }
    _mm_sfence();
    memcpy(dst + i, src + i, n - i);
}

static void copy_sse2(char *dst, const char *src, size_t n) {
    size_t head = (64 - ((uintptr_t)dst & 63)) & 63, i;
    memcpy(dst, src, head);
    for (i = head; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    _mm_sfence();
    memcpy(dst + i, src + i, n - i);
}
#endif

/* The copy of each kind this CPU runs, the chosen one (copy()'s default) first. */
struct kind {
    const char *name;
    copy_fn fn;
};
static struct kind kinds[3];
static int nkinds;

static void add_kind(const char *name, copy_fn fn) {
    kinds[nkinds].name = name;
    kinds[nkinds++].fn = fn;
}

static PyObject *py_copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Py_ssize_t n;
    const char *kind = NULL;
    copy_fn fn = kinds[0].fn;
    if (!PyArg_ParseTuple(args, "KKn|s:copy", &dst, &src, &n, &kind))
        return NULL;
    if (kind) {
        int k;
        for (k = 0; k < nkinds && strcmp(kinds[k].name, kind); k++)
            ;
        if (k == nkinds) {
            PyErr_Format(PyExc_ValueError, "copy: kind %s is not one this CPU runs", kind);
            return NULL;
        }
        fn = kinds[k].fn;
    }
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "copy: negative length %zd", n);
        return NULL;
    }
    char *d = (char *)(uintptr_t)dst;
    const char *s = (const char *)(uintptr_t)src;
    if (n && (!d || !s)) {
        PyErr_SetString(PyExc_ValueError, "copy: null address");
        return NULL;
    }
    /* Overlapping ranges (never the case for a slot and a tensor) and short copies take memmove. */
    int overlap = dst < src + (unsigned long long)n && src < dst + (unsigned long long)n;
    Py_BEGIN_ALLOW_THREADS
    if (overlap || (size_t)n < STREAM_MIN)
        memmove(d, s, (size_t)n);
    else
        fn(d, s, (size_t)n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_kind(PyObject *self, PyObject *unused) { return PyUnicode_FromString(kinds[0].name); }

static PyObject *py_kinds(PyObject *self, PyObject *unused) {
    PyObject *list = PyList_New(nkinds);
    for (int k = 0; list && k < nkinds; k++) {
        PyObject *name = PyUnicode_FromString(kinds[k].name);
        if (!name) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, name);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"copy", py_copy, METH_VARARGS, "copy(dst, src, n[, kind]): copy n bytes from address src to address dst with"
                                    " streaming stores (of `kind`, one of kinds(); default kind()), without the GIL"},
    {"kind", py_kind, METH_NOARGS, "kind(): the instructions copy() uses on this CPU"},
    {"kinds", py_kinds, METH_NOARGS, "kinds(): every kind of copy this CPU runs, kind() first"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "snapguard._stream",
                                    "Bulk copies with non-temporal stores.", -1, methods};

PyMODINIT_FUNC PyInit__stream(void) {
    nkinds = 0;
#ifdef SNAPGUARD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        add_kind("avx2", copy_avx2);
    add_kind("sse2", copy_sse2);
#endif
    add_kind("memcpy", copy_plain);
    return PyModule_Create(&module);
}
