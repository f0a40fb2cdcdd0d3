/**
 * The checkpoint shapes each UNet block reads, as lists of (key suffix, PyTorch shape): every block's
 * `static shapes()` sits next to its `load()`, and expectedShapes (unet.ts) joins them under their prefixes.
 */
export type Shapes = [string, number[]][];

/** Puts `prefix.` in front of every key. */
export const prefixed = (prefix: string, s: Shapes): Shapes => s.map(([k, v]) => [`${prefix}.${k}`, v]);
