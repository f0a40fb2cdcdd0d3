/**
 * SDXL's text side under a residency policy (src/nn/residency.ts). Resident, the two encoders are backend tensors
 * for the model's life; streamed (wasm's default), their weights stay outside the backend as a host copy of the
 * checkpoint's bytes and become tensors only while a prompt is encoded (once a generation), then are freed. That
 * frees ViT-L + ViT-bigG's 3.05 GiB of fp32 weights on wasm's 4 GiB heap for the UNet's streamed blocks (SDXL's
 * largest, the middle block, is 1.54 GiB) and the VAE's feature maps: without it SDXL cannot run on wasm at all.
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
   * memory, from which it is built again at every encode.
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
  const make = (s: TensorSource) => new SdxlConditioner(SdxlTextEncoder.load(s, tokenizer, cfg.text), cfg.timeEmbedDim);
  if (policy === 'resident') return make(src);
  return StreamedTextConditioner.load(src, sdxlTextShapes(cfg.text).keys(), make);
}
