/**
 * What a whole txt2img generation needs of the wasm backend's heap (wasm32: at most 4 GiB, and it never shrinks),
 * projected from the configs before anything is loaded: per network its fp32 weights, whether they are resident
 * or streamed (src/nn/residency.ts) and at what granularity, and per phase of a generation what is on the heap at
 * its peak. Weights a network holds resident stay on the heap in every phase; streamed ones only while their unit
 * (a layer, a block, the whole model) runs.
 *
 * Measured on tfjs-backend-wasm 4.22 (this repository's kernels, one thread), the constants below:
 *   - a weight that has run once costs PACKED_WEIGHT_FACTOR x its bytes while it lives: XNNPACK keeps a packed
 *     copy of every matMul / conv operand it has seen until the tensor is disposed (8 linears [1280, 5120],
 *     200 MiB, grew the heap by 322 MiB more when they ran; a second round reused it)
 *   - the VAE decoder: the heap after a decode is VAE_DECODE_BASE_FACTOR x the VAE's weights (the weights, the
 *     packed convs) plus VAE_DECODE_BYTES_PER_PIXEL per output pixel (SD 1.x / SDXL VAE, 128x128 and 256x256
 *     images: 810 and 1062 MiB; so 2.1 GiB at 512x512 and 5.9 GiB at 1024x1024 in one piece)
 *   - the UNet's feature maps: every skip (batch 2) plus ACTIVATION_MAPS maps of its largest level and the GEGLU
 *     of its largest attention level (an estimate, not a measurement; attention scores are sliced to 8 MiB)
 */
import { sdxlTextShapes } from '../clip/sdxl-text.js';
import { expectedShapes as clipShapes } from '../clip/index.js';
import { expectedShapes as unetShapes, unetBlockPlan, type UNetConfig } from '../unet/index.js';
import { downsampleFactor, expectedShapes as vaeShapes } from '../vae/index.js';
import { VAE_DECODE_BYTES_PER_PIXEL, WASM_MAX_DECODE_BYTES, WASM_TILES } from '../vae/tiled.js';
import type { AnyPipelineConfig } from './config.js';

export const WASM_HEAP_LIMIT = 4 * 2 ** 30 - 2 ** 16;
export const PACKED_WEIGHT_FACTOR = 2.6;
export const VAE_DECODE_BASE_FACTOR = 2.28;
export { VAE_DECODE_BYTES_PER_PIXEL };
const ACTIVATION_MAPS = 8;

/** How a network's weights are held on wasm: resident, or streamed one unit at a time. */
export type Granularity = 'resident' | 'model' | 'block' | 'layer';

export interface PlanChoices {
  readonly text: Granularity; // 'model': the encoders built whole at each prompt; 'layer': their embeddings + one layer
  readonly unet: Granularity; // 'block': one input/middle/output block; 'layer': a block's own weights + one transformer block
  readonly vae: Granularity;
  /** The VAE decodes in tiles of at most this many output pixels a side (0: in one piece). */
  readonly vaeTile: number;
}

/**
 * What the code does on wasm now: SD 1.x text resident, SDXL's streamed layer by layer (streamed-text.ts); the
 * UNet's blocks streamed, each transformer block of them a unit of its own (unet/transformer.ts); the VAE resident,
 * decoding in one piece up to SD 1.x's 512x512 and in 512x512 tiles beyond (vae/tiled.ts).
 */
export function currentChoices(cfg: AnyPipelineConfig, width: number, height: number): PlanChoices {
  const tiled = width * height * VAE_DECODE_BYTES_PER_PIXEL > WASM_MAX_DECODE_BYTES; // vae/tiled.ts's needsTiles
  return { text: 'family' in cfg ? 'layer' : 'resident', unet: 'layer', vae: 'resident', vaeTile: tiled ? WASM_TILES.tile * downsampleFactor(cfg.vae) : 0 };
}

export interface NetworkPlan {
  readonly name: 'text' | 'unet' | 'vae';
  readonly granularity: Granularity;
  readonly weightBytes: number; // fp32, on the heap when resident
  readonly largestUnitBytes: number; // what one streamed unit puts on the heap
  readonly largestUnit: string;
}

export interface PhasePlan {
  readonly name: 'text encode' | 'UNet step' | 'VAE decode';
  /** Heap at the phase's peak, and its parts. */
  readonly bytes: number;
  readonly parts: Readonly<Record<string, number>>;
}

export interface HeapPlan {
  readonly width: number;
  readonly height: number;
  readonly networks: readonly NetworkPlan[];
  readonly phases: readonly PhasePlan[];
  readonly peakBytes: number;
  readonly peakPhase: PhasePlan['name'];
  readonly fits: boolean;
}

const numel = (s: readonly number[]) => s.reduce((a, d) => a * d, 1);

/**
 * A network's largest streamed unit. 'block': one UNet block (input/middle/output, the time embedding) or one text
 * encoder; 'layer': a block's own weights (ResBlocks, norms, projections, embeddings), alive while it runs, plus
 * its largest transformer layer, the only one built at a time.
 */
function network(name: NetworkPlan['name'], g: Granularity, shapes: ReadonlyMap<string, readonly number[]>): NetworkPlan {
  const layerRe = /\.(?:encoder\.layers|resblocks|transformer_blocks)\.(\d+)\./;
  const blockOf = (k: string): string =>
    (/\.((?:input|output)_blocks\.\d+|middle_block|time_embed|out)\./.exec(k.replace('label_emb', 'time_embed'))?.[1] ??
      /^(conditioner\.embedders\.\d+|cond_stage_model)/.exec(k)?.[1] ??
      'the rest');
  const blocks = new Map<string, { own: number; layers: Map<string, number> }>();
  let total = 0;
  for (const [k, s] of shapes) {
    const bytes = 4 * numel(s);
    total += bytes;
    const b = g === 'resident' || g === 'model' ? 'the whole model' : blockOf(k);
    const entry = blocks.get(b) ?? { own: 0, layers: new Map<string, number>() };
    const layer = g === 'layer' ? layerRe.exec(k) : null;
    if (layer === null) entry.own += bytes;
    else entry.layers.set(layer[0], (entry.layers.get(layer[0]) ?? 0) + bytes);
    blocks.set(b, entry);
  }
  let largestUnit = '';
  let largestUnitBytes = 0;
  for (const [b, { own, layers }] of blocks) {
    const [layer, bytes] = [...layers].reduce((a, c) => (c[1] > a[1] ? c : a), ['', 0]);
    if (own + bytes > largestUnitBytes) [largestUnit, largestUnitBytes] = [layer === '' ? b : `${b} + one ${layer.includes('transformer_blocks') ? 'transformer block' : 'layer'} (${(bytes / 2 ** 20).toFixed(0)} MiB)`, own + bytes];
  }
  return { name, granularity: g, weightBytes: total, largestUnit, largestUnitBytes };
}

/** The UNet's feature maps at its peak (see the header): skips, ACTIVATION_MAPS maps of the largest level, GEGLU. */
export function unetActivationBytes(cfg: UNetConfig, h: number, w: number, batch = 2): number {
  const plan = unetBlockPlan(cfg);
  let [hh, ww] = [h, w];
  let skips = 0;
  let largest = 0;
  let geglu = 0;
  for (const spec of plan.input) {
    if (spec.kind === 'down') [hh, ww] = [Math.ceil(hh / 2), Math.ceil(ww / 2)];
    const ch = spec.kind === 'down' ? spec.ch : spec.cout;
    const map = 4 * batch * hh * ww * ch;
    skips += map;
    largest = Math.max(largest, map);
    if (spec.kind === 'res' && spec.attention !== null) geglu = Math.max(geglu, 4 * batch * hh * ww * ch * 12); // proj to 8c, the gelu and the product at 4c
  }
  return skips + ACTIVATION_MAPS * largest + geglu;
}

/** The heap plan of a `width` x `height` txt2img with CFG (batch 2) under `choices` (default: what the code does). */
export function wasmHeapPlan(cfg: AnyPipelineConfig, width: number, height: number, choices: PlanChoices = currentChoices(cfg, width, height)): HeapPlan {
  const textShapes = 'family' in cfg ? sdxlTextShapes(cfg.text) : clipShapes(cfg.clip);
  const text = network('text', choices.text, textShapes);
  const unet = network('unet', choices.unet, unetShapes(cfg.unet));
  const vae = network('vae', choices.vae, vaeShapes(cfg.vae));
  const resident = (n: NetworkPlan) => (n.granularity === 'resident' ? n.weightBytes * PACKED_WEIGHT_FACTOR : 0);
  const running = (n: NetworkPlan) => (n.granularity === 'resident' ? 0 : n.largestUnitBytes * PACKED_WEIGHT_FACTOR);
  // the VAE's resident weights after its first decode (their packed convs stay with them)
  const vaeHeld = choices.vae === 'resident' ? vae.weightBytes * VAE_DECODE_BASE_FACTOR : 0;
  const tile = choices.vaeTile > 0 ? Math.min(choices.vaeTile, width) * Math.min(choices.vaeTile, height) : width * height;
  const phase = (name: PhasePlan['name'], parts: Record<string, number>): PhasePlan => ({ name, parts, bytes: Object.values(parts).reduce((a, b) => a + b, 0) });
  const phases = [
    phase('text encode', { 'text weights': resident(text) + running(text), 'UNet resident': resident(unet), 'VAE resident': vaeHeld }),
    phase('UNet step', {
      'text resident': resident(text),
      'UNet weights': resident(unet) + running(unet),
      'VAE resident': vaeHeld,
      'feature maps': unetActivationBytes(cfg.unet, height / 8, width / 8),
    }),
    phase('VAE decode', {
      'text resident': resident(text),
      'UNet resident': resident(unet),
      'VAE weights': choices.vae === 'resident' ? vaeHeld : vae.largestUnitBytes * VAE_DECODE_BASE_FACTOR,
      'feature maps': tile * VAE_DECODE_BYTES_PER_PIXEL,
    }),
  ];
  const peak = phases.reduce((a, b) => (b.bytes > a.bytes ? b : a));
  return { width, height, networks: [text, unet, vae], phases, peakBytes: peak.bytes, peakPhase: peak.name, fits: peak.bytes <= WASM_HEAP_LIMIT };
}

/** The plan as lines of text (GiB), for reports. */
export function formatHeapPlan(p: HeapPlan): string[] {
  const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`;
  return [
    ...p.networks.map((n) => `${n.name}: ${gib(n.weightBytes)} fp32, ${n.granularity}${n.granularity === 'resident' ? '' : `, largest unit ${n.largestUnit} ${gib(n.largestUnitBytes)}`}`),
    ...p.phases.map((ph) => `${ph.name}: ${gib(ph.bytes)} (${Object.entries(ph.parts).filter(([, b]) => b > 0).map(([k, b]) => `${k} ${gib(b)}`).join(', ')})`),
    `peak ${gib(p.peakBytes)} in ${p.peakPhase}: ${p.fits ? 'fits' : 'does not fit'} the 4 GiB heap`,
  ];
}
