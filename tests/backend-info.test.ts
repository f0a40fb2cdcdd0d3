/**
 * `sd info`: the report names the backend in use, and for every better backend not in use why and the command
 * that enables it (sd setup-native for tensorflow).
 */
import { describe, expect, it } from 'vitest';
import { gatherInfo, infoLines, type InfoFacts } from '../src/cli/commands/info.js';

const base: Omit<InfoFacts, 'choice' | 'notUsed'> = {
  tfjsVersion: '4.22.0', native: null, wasm: { threads: 2, simd: true, limitedBy: null }, simd: true, cpu: 'Test CPU', cores: 2, node: '20.0.0',
  kernels: null,
};

describe('sd info', () => {
  it('gives the reason and the fix for a skipped better backend', () => {
    const why = 'libtensorflow not found; run `sd setup-native` (@tensorflow/tfjs-node is not installed)';
    const lines = infoLines({
      ...base,
      choice: { name: 'wasm', threads: 2, skipped: { tensorflow: why } },
      notUsed: [{ name: 'tensorflow', why, fix: 'sd setup-native' }],
    });
    expect(lines[0]).toMatch(/^backend\s+wasm/);
    expect(lines.find((l) => l.startsWith('threads'))).toMatch(/2 of 2 logical cores/);
    expect(lines.find((l) => l.startsWith('not tensorflow'))).toContain(why);
    expect(lines.find((l) => l.includes('enable with'))).toContain('sd setup-native');
    expect(lines.find((l) => l.startsWith('native kernels'))).toMatch(/in use/);
    const off = infoLines({ ...base, kernels: 'turned off by SD_KERNELS=0', choice: { name: 'wasm', threads: 2, skipped: {} }, notUsed: [] });
    expect(off.find((l) => l.startsWith('native kernels'))).toMatch(/not in use: turned off by SD_KERNELS=0/);
    expect(off.find((l) => l.startsWith('bf16'))).toBeUndefined(); // not said where the kernels are not in use
  });

  it('says whether --precision bf16 can run, and why not', () => {
    const choice = { name: 'tensorflow', threads: null, skipped: {} } as const;
    const amx = infoLines({ ...base, bf16: null, bf16Isa: 'amx', choice, notUsed: [] });
    expect(amx.find((l) => l.startsWith('bf16'))).toMatch(/available on AMX tiles: --precision bf16/);
    const avx = infoLines({ ...base, bf16: null, bf16Isa: 'avx512bf16', choice, notUsed: [] });
    expect(avx.find((l) => l.startsWith('bf16'))).toMatch(/available on AVX512-BF16 \(VDPBF16PS\): --precision bf16/);
    const no = infoLines({ ...base, bf16: 'this CPU (or its OS) has neither AMX-BF16 nor AVX512-BF16', choice, notUsed: [] });
    expect(no.find((l) => l.startsWith('bf16'))).toMatch(/not available: this CPU \(or its OS\) has neither AMX-BF16 nor AVX512-BF16/);
  });

  it('on the forced cpu backend lists tensorflow and wasm as better, wasm as available', async () => {
    const facts = await gatherInfo({ backend: 'cpu' });
    expect(facts.choice.name).toBe('cpu');
    expect(facts.notUsed.map((n) => n.name)).toEqual(['tensorflow', 'wasm']);
    expect(facts.notUsed[1].why).toMatch(/available/);
    const tensorflow = facts.notUsed[0];
    expect(tensorflow.fix).toMatch(/sd setup-native|--backend tensorflow/);
    expect(facts.kernels).toMatch(/not built|tensorflow backend|SD_KERNELS/); // never in use on cpu unless forced
  });
});
