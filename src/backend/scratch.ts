/**
 * The native kernels' outputs, reused from one block to the next instead of left to the garbage collector.
 *
 * Every kernel call makes a fresh output (a UNet step makes ~700 of 3-85 MB). Each is an ArrayBuffer whose memory V8
 * counts as external, and external memory that grows fast makes V8 collect: ~120 full collections a SD 1.5 step
 * (~125 ms of pauses, `--trace-gc`: "external memory pressure") whose marking and sweeping threads take the cores
 * from the kernels' own threads (2-core AMD EPYC: a UNet step's kernels ran 0.5-1.1 s over their own best times).
 * Reused, a step makes ~24 collections (the rest: TensorFlow's tensors read to the host) and SD 1.5's UNet step went
 * from 4.38-5.17 to 4.08-4.30 s (three steps each, interleaved), for ~300 MB more peak RSS during the steps.
 *
 * A block run on the host (backend/native-blocks.ts) runs inside `scratchScope`: the outputs its kernels take are lent
 * to it, and when it ends all but its result go back to a free list that the next block's kernels take from. Nothing
 * is reused inside a scope, so no kernel can be handed an array that one of its inputs still lives in; an array is
 * reused only once the block that made it has returned, and a block keeps nothing but its result.
 *
 * The free list holds at most SCRATCH_MAX_BYTES, freeing the arrays unused longest to make room; an array serves a
 * request down to SCRATCH_SLACK of its length (a view of its first elements), so that near sizes share.
 * `dropScratch` frees them all (trimHeap does, when a model is freed).
 */

/** The most the free list keeps between blocks. */
export const SCRATCH_MAX_BYTES = 512 * 1024 * 1024;
/**
 * Larger outputs are never lent: they are the VAE's full-resolution feature maps (134-537 MB, a few per decode), whose
 * churn costs little, and lending them split the heap: SDXL's decode peaked at 9.4 GB with them, 7.9 GB without
 * (8.4 GB before any reuse).
 */
export const SCRATCH_MAX_ARRAY_BYTES = 96 * 1024 * 1024;
/** An array serves a request down to this fraction of its length. */
const SCRATCH_SLACK = 0.8;

const free: Float32Array[] = []; // whole buffers, the longest unused first
let freeBytes = 0;
let lent: Float32Array[] | null = null; // the current scope's arrays, as views of their buffers
let release: (a: Float32Array) => void = () => undefined; // left to the garbage collector until told how

/** How to free an array's memory now (backend/kernels.ts: the addon detaches its buffer). */
export function setScratchRelease(f: (a: Float32Array) => void): void {
  release = f;
}

/**
 * Memory for `length` float32 values, not zeroed (Buffer.allocUnsafeSlow: one malloc'd block of its own): every
 * kernel writes each element of its output (NaN where it could not allocate its scratch). A zeroed Float32Array would
 * clear the block first, or fault its pages in zeroed: the memory written twice. On SD 1.5's [8192, 320] x [320, 1280]
 * Linear that first write was ~15% of the call (2-core AMD EPYC). Inside a scope it is the shortest free array that
 * serves it; where none does, the arrays unused longest are freed until the new one fits beside the rest under
 * SCRATCH_MAX_BYTES (a model after another, the VAE after the UNet, finds arrays of other sizes there).
 */
export function kernelOutput(length: number): Float32Array {
  if (lent === null || length * Float32Array.BYTES_PER_ELEMENT > SCRATCH_MAX_ARRAY_BYTES) return fresh(length);
  let best = -1;
  for (let i = 0; i < free.length; i++) {
    const n = free[i].length;
    if (n >= length && n * SCRATCH_SLACK <= length && (best < 0 || n < free[best].length)) best = i;
  }
  let a: Float32Array;
  if (best >= 0) {
    const [buffer] = free.splice(best, 1);
    freeBytes -= buffer.byteLength;
    a = new Float32Array(buffer.buffer, 0, length);
  } else {
    evictFor(length * Float32Array.BYTES_PER_ELEMENT);
    a = fresh(length);
  }
  lent.push(a);
  return a;
}

function fresh(length: number): Float32Array {
  return new Float32Array(Buffer.allocUnsafeSlow(length * Float32Array.BYTES_PER_ELEMENT).buffer, 0, length);
}

/** Frees the arrays unused longest until `bytes` more fit under the cap. */
function evictFor(bytes: number): void {
  while (free.length > 0 && freeBytes + bytes > SCRATCH_MAX_BYTES) {
    const a = free.shift()!;
    freeBytes -= a.byteLength;
    release(a);
  }
}

/** Runs a block; the kernel outputs it took, other than its result's, are reused by the blocks after it. */
export function scratchScope<R extends { readonly data: Float32Array }>(f: () => R): R {
  const outer = lent;
  const mine: Float32Array[] = [];
  lent = mine;
  let result: R | undefined;
  try {
    result = f();
    return result;
  } finally {
    lent = outer;
    for (const a of mine) {
      if (result === undefined || a.buffer !== result.data.buffer) giveBack(a);
      else outer?.push(a); // an enclosing scope's to reuse once it ends
    }
  }
}

function giveBack(a: Float32Array): void {
  const whole = new Float32Array(a.buffer);
  evictFor(whole.byteLength);
  free.push(whole);
  freeBytes += whole.byteLength;
}

/** Frees every array on the free list now. */
export function dropScratch(): void {
  evictFor(Infinity);
}

/** Bytes on the free list (tests). */
export function scratchBytes(): number {
  return freeBytes;
}
