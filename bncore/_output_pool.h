/* A NumPy memory handler (NEP 49) for the large outputs bncore allocates.
 *
 * A fresh 205 MB output costs more than the batch norm that fills it: the
 * operating system maps and zeroes its pages one fault at a time as the
 * kernel first writes them (here 20-140 ms, against 15 ms for the whole
 * eval forward into an existing array), and giving the memory back unmaps
 * it again. An inference loop `y = bn(x)` pays that on every call.
 *
 * So the buffers of large outputs go, when NumPy frees them, into a few
 * slots instead of back to the system, and a later output of the same size
 * (or up to 1/8 smaller) takes one: its pages are already mapped. Fresh
 * buffers of 4 MiB and more ask for transparent huge pages, as NumPy's own
 * allocator does (without them a fresh 64 MB output faulted in 3x slower
 * than np.empty's). Everything else is plain malloc / calloc / realloc /
 * free. NumPy records the handler in each array, so an array allocated here
 * is freed here, wherever it dies.
 *
 * Bounded: at most BN_POOL_SLOTS buffers, BN_POOL_MAX_BYTES in all, are
 * kept; bn_pool_release() (bncore.release_memory()) frees them. The slots
 * are only touched with the GIL held (NumPy allocates and frees array data
 * under it), as NumPy's own small-buffer cache. NumPy itself reports the
 * buffers to tracemalloc around these calls (while they belong to an array,
 * not while they wait in a slot). */
#ifndef BNCORE_OUTPUT_POOL_H
#define BNCORE_OUTPUT_POOL_H

#include <Python.h>
#include <stdlib.h>
#include <numpy/ndarraytypes.h>

/* A kept buffer is matched by the bytes malloc really gave it, not by the
 * size NumPy reports at free time, so that no mismatch between the two can
 * ever hand out a buffer too small: that needs malloc_usable_size (glibc,
 * musl). Elsewhere nothing is kept. */
#if defined(__GLIBC__) || defined(__linux__)
#include <malloc.h>
#include <sys/mman.h>
#define BN_POOL_ENABLED 1
#else
#define BN_POOL_ENABLED 0
#define malloc_usable_size(p) ((size_t)0)
#endif

#define BN_POOL_MIN_BYTES ((size_t)16 << 20)
#define BN_POOL_SLOTS 2
#define BN_POOL_MAX_BYTES ((size_t)1 << 30)
/* Where NumPy asks for huge pages (numpy/_core/src/multiarray/alloc.c). */
#define BN_POOL_HUGE_BYTES ((size_t)4 << 20)

typedef struct {
    void *ptr;
    size_t usable;  /* malloc_usable_size(ptr) */
} bn_pool_slot;

static bn_pool_slot bn_pool_slots[BN_POOL_SLOTS];
static size_t bn_pool_bytes = 0;

static void *bn_pool_take(size_t size)
{
    /* Big enough, and not much bigger (a kept buffer would otherwise pin
     * memory far beyond what it serves). */
    for (int k = 0; k < BN_POOL_SLOTS; k++) {
        size_t usable = bn_pool_slots[k].usable;
        if (bn_pool_slots[k].ptr != NULL && usable >= size && usable - size <= size / 8) {
            void *ptr = bn_pool_slots[k].ptr;
            bn_pool_slots[k].ptr = NULL;
            bn_pool_bytes -= usable;
            return ptr;
        }
    }
    return NULL;
}

static int bn_pool_keep(void *ptr)
{
    size_t usable = malloc_usable_size(ptr);
    if (!BN_POOL_ENABLED || usable < BN_POOL_MIN_BYTES
            || bn_pool_bytes + usable > BN_POOL_MAX_BYTES)
        return 0;
    for (int k = 0; k < BN_POOL_SLOTS; k++) {
        if (bn_pool_slots[k].ptr == NULL) {
            bn_pool_slots[k].ptr = ptr;
            bn_pool_slots[k].usable = usable;
            bn_pool_bytes += usable;
            return 1;
        }
    }
    return 0;
}

/* Ask for transparent huge pages on the whole pages inside [ptr, ptr + size). */
static void bn_pool_advise_huge(void *ptr, size_t size)
{
#if defined(MADV_HUGEPAGE)
    const uintptr_t page = 4096;
    uintptr_t start = ((uintptr_t)ptr + page - 1) & ~(page - 1);
    uintptr_t end = ((uintptr_t)ptr + size) & ~(page - 1);
    if (size >= BN_POOL_HUGE_BYTES && end > start)
        madvise((void *)start, end - start, MADV_HUGEPAGE);  /* a hint: failure is fine */
#else
    (void)ptr, (void)size;
#endif
}

static void *bn_pool_malloc(void *ctx, size_t size)
{
    void *ptr = size >= BN_POOL_MIN_BYTES ? bn_pool_take(size) : NULL;
    (void)ctx;
    if (ptr == NULL) {
        ptr = malloc(size == 0 ? 1 : size);
        if (ptr != NULL)
            bn_pool_advise_huge(ptr, size);
    }
    return ptr;
}

static void *bn_pool_calloc(void *ctx, size_t nelem, size_t elsize)
{
    /* Zeroed memory: never a recycled buffer. */
    (void)ctx;
    return calloc(nelem == 0 ? 1 : nelem, elsize == 0 ? 1 : elsize);
}

static void *bn_pool_realloc(void *ctx, void *ptr, size_t new_size)
{
    (void)ctx;
    return realloc(ptr, new_size == 0 ? 1 : new_size);
}

static void bn_pool_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (ptr == NULL)
        return;
    (void)size;  /* see bn_pool_slot */
    if (!bn_pool_keep(ptr))
        free(ptr);
}

/* Free every kept buffer; returns the bytes given back. */
static size_t bn_pool_release(void)
{
    size_t released = bn_pool_bytes;
    for (int k = 0; k < BN_POOL_SLOTS; k++) {
        free(bn_pool_slots[k].ptr);
        bn_pool_slots[k].ptr = NULL;
    }
    bn_pool_bytes = 0;
    return released;
}

static size_t bn_pool_kept_bytes(void)
{
    return bn_pool_bytes;
}

static PyDataMem_Handler bn_pool_handler = {
    "bncore_output_pool",
    1,
    {NULL, bn_pool_malloc, bn_pool_calloc, bn_pool_realloc, bn_pool_free},
};

#endif
