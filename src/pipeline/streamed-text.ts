/**
 * SDXL's text side under a residency policy (src/nn/residency.ts). Resident, the two encoders are backend tensors
 * for the model's life; streamed (wasm's default), their weights stay outside the backend as a host copy of the
 * checkpoint's bytes: the encoders' embeddings are built for each prompt (once a generation) and freed after it,
 * each transformer layer only while it runs. ViT-L + ViT-bigG are 3.05 GiB of fp32 weights, and XNNPACK keeps a
 * packed copy of each matMul weight it has run (wasm-plan.ts): whole, they could not encode within wasm's 4 GiB
 * heap at all; streamed, a prompt needs bigG's embeddings and one layer, ~0.3 GiB, and nothing stays between prompts.
 */
import { SdxlTextEncoder, sdxlTextShapes } from '../clip/sdxl-text.js';
import { Held, HostTensors, defaultResidency, type ResidencyPolicy } from '../nn/residency.js';
import type { ClipTokenizer } from '../tokenizer/index.js';
import type { TensorSource } from '../weights/types.js';
import { SdxlConditioner, type EncodeOptions, type GuidedConditioning, type Prompts, type TextConditioner } from './conditioning.js';
import type { SdxlPipelineConfig } from './sdxl-config.js';

/** A text conditioner built from a host copy at every encode and disposed right after. */
export class StreamedTextConditioner implements TextConditioner {
  private constructor(
    private readonly held: Held<TextConditioner>,
    private readonly host: HostTensors,
  ) {}

  /**
   * `make` builds the conditioner from a source. It is built once from `src` first, with every check its loader
   * makes (a checkpoint that does not fit fails at load, not at the first prompt), then `keys` are copied to host
   * memory, from which it is built again at every encode. `make` should itself stream what it can (SDXL: each
   * encoder's layers, one at a time), so that neither this first build nor an encode holds the whole text side.
   */
  static load(src: TensorSource, keys: Iterable<string>, make: (src: TensorSource) => TextConditioner): StreamedTextConditioner {
    make(src).dispose();
    const host = HostTensors.copy(src, keys);
    try {
      return new StreamedTextConditioner(Held.load('streamed', () => make(host)), host);
    } catch (e) {
      host.close();
      throw e;
    }
  }

  encode(prompts: Prompts, o: EncodeOptions): GuidedConditioning {
    return this.held.use((t) => t.encode(prompts, o));
  }

  /** Bytes of the encoders' weights held outside the backend. */
  get hostBytes(): number {
    return this.host.byteLength;
  }

  dispose(): void {
    this.held.dispose();
    this.host.close();
  }
}

/** SDXL's conditioner: resident, or streamed (the default on wasm). */
export function sdxlTextConditioner(
  src: TensorSource,
  tokenizer: ClipTokenizer,
  cfg: SdxlPipelineConfig,
  policy: ResidencyPolicy = defaultResidency(),
): TextConditioner {
  const make = (s: TensorSource) => new SdxlConditioner(SdxlTextEncoder.load(s, tokenizer, cfg.text, policy), cfg.timeEmbedDim);
  if (policy === 'resident') return make(src);
  return StreamedTextConditioner.load(src, sdxlTextShapes(cfg.text).keys(), make);
}
