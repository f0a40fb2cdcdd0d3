/** The fixtures' comparison rule: max |actual - expected| <= tolerance * max |expected|. */

export type Numbers = ArrayLike<number>;

/** max |a - e| / max |e| (absolute error when expected is all zeros). Throws if the lengths differ. */
export function maxRelError(actual: Numbers, expected: Numbers): number {
  if (actual.length !== expected.length) {
    throw new Error(`length mismatch: got ${actual.length} values, expected ${expected.length}`);
  }
  let maxDiff = 0;
  let maxRef = 0;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (Number.isNaN(d)) return NaN; // fails every tolerance
    if (d > maxDiff) maxDiff = d;
    const r = Math.abs(expected[i]);
    if (r > maxRef) maxRef = r;
  }
  return maxRef === 0 ? maxDiff : maxDiff / maxRef;
}

export function withinTolerance(actual: Numbers, expected: Numbers, tolerance: number): { passed: boolean; maxRelError: number } {
  const err = maxRelError(actual, expected);
  return { passed: err <= tolerance, maxRelError: err };
}
