/* A NumPy memory handler (NEP 49) for the large outputs bncore allocates.
 *
 * A fresh 205 MB output costs more than the batch norm that fills it: the
 * operating system maps and zeroes its pages one fault at a time as the
 * kernel first writes them (here 20-140 ms, against 15 ms for the whole
 * eval forward into an existing array), and giving the memory back unmaps
 * it again. An inference loop `y = bn(x)` pays that on every call.
 *
 * So the buffers of large outputs go, when NumPy frees them, into a few
 * slots instead of back to the system, and a later output of exactly the
 * same size takes one: its pages are already mapped. Everything else is
 * plain malloc / calloc / realloc / free. NumPy records the handler in each
 * array, so an array allocated here is freed here, wherever it dies.
 *
 * Bounded: at most BN_POOL_SLOTS buffers, BN_POOL_MAX_BYTES in all, are
 * kept; bn_pool_release() (bncore.release_memory()) frees them. The slots
 * are only touched with the GIL held (NumPy allocates and frees array data
 * under it), as NumPy's own small-buffer cache. Allocations are reported to
 * tracemalloc in NumPy's domain while they belong to an array, not while
 * they wait in a slot. */
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
#define BN_POOL_ENABLED 1
#else
#define BN_POOL_ENABLED 0
#define malloc_usable_size(p) ((size_t)0)
#endif

#define BN_POOL_MIN_BYTES ((size_t)16 << 20)
#define BN_POOL_SLOTS 2
#define BN_POOL_MAX_BYTES ((size_t)1 << 30)
/* NumPy's tracemalloc domain (numpy/_core/src/multiarray/alloc.c). */
#define BN_POOL_TRACE_DOMAIN 389047

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

static void *bn_pool_malloc(void *ctx, size_t size)
{
    void *ptr = size >= BN_POOL_MIN_BYTES ? bn_pool_take(size) : NULL;
    (void)ctx;
    if (ptr == NULL)
        ptr = malloc(size == 0 ? 1 : size);
    if (ptr != NULL)
        PyTraceMalloc_Track(BN_POOL_TRACE_DOMAIN, (uintptr_t)ptr, size);
    return ptr;
}

static void *bn_pool_calloc(void *ctx, size_t nelem, size_t elsize)
{
    /* Zeroed memory: never a recycled buffer. */
    void *ptr = calloc(nelem == 0 ? 1 : nelem, elsize == 0 ? 1 : elsize);
    (void)ctx;
    if (ptr != NULL)
        PyTraceMalloc_Track(BN_POOL_TRACE_DOMAIN, (uintptr_t)ptr, nelem * elsize);
    return ptr;
}

static void *bn_pool_realloc(void *ctx, void *ptr, size_t new_size)
{
    /* Untracked first: once realloc has run, ptr may not be used. */
    size_t old_size = ptr == NULL ? 0 : malloc_usable_size(ptr);
    void *moved;
    (void)ctx;
    if (ptr != NULL)
        PyTraceMalloc_Untrack(BN_POOL_TRACE_DOMAIN, (uintptr_t)ptr);
    moved = realloc(ptr, new_size == 0 ? 1 : new_size);
    if (moved != NULL)
        PyTraceMalloc_Track(BN_POOL_TRACE_DOMAIN, (uintptr_t)moved, new_size);
    else if (ptr != NULL)  /* failed: ptr is still the caller's */
        PyTraceMalloc_Track(BN_POOL_TRACE_DOMAIN, (uintptr_t)ptr, old_size);
    return moved;
}

static void bn_pool_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (ptr == NULL)
        return;
    (void)size;  /* see bn_pool_slot */
    PyTraceMalloc_Untrack(BN_POOL_TRACE_DOMAIN, (uintptr_t)ptr);
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
