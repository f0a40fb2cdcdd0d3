/**
 * Where a CLIP text encoder's parts live in a checkpoint, relative to the encoder's prefix: one table per naming.
 * The encoder and its layers load themselves through a table, so both namings share one definition of the network.
 *
 *   part                 HF CLIPTextModel (SD 1.x, SDXL encoder 1)    open_clip (SDXL encoder 2)
 *   token embedding      embeddings.token_embedding                    token_embedding
 *   position embedding   embeddings.position_embedding.weight          positional_embedding
 *   layer i              encoder.layers.{i}                            transformer.resblocks.{i}
 *     pre-attention norm   layer_norm1                                   ln_1
 *     q, k, v              self_attn.{q,k,v}_proj                        attn.in_proj (one [3w, w] Linear: q; k; v)
 *     attention output     self_attn.out_proj                            attn.out_proj
 *     pre-MLP norm         layer_norm2                                   ln_2
 *     MLP                  mlp.fc1, mlp.fc2                              mlp.c_fc, mlp.c_proj
 *   final norm           final_layer_norm                              ln_final
 *   text projection      (none)                                        text_projection [w, proj], used as x @ P
 *
 * Entries name modules (their `.weight` and `.bias` are read), except the position embedding and the text
 * projection, which are plain tensors. torch's nn.MultiheadAttention keeps its packed projection as the tensors
 * `attn.in_proj_weight` / `attn.in_proj_bias`, not as a module: open-clip.ts spells them as the module `attn.in_proj`.
 */

export interface ClipLayerNames {
  readonly layerNorm1: string;
  /** Three Linears [w, w], or one Linear [3w, w] whose equal row blocks are q, k and v. */
  readonly qkv: readonly [q: string, k: string, v: string] | { readonly packed: string };
  readonly outProj: string;
  readonly layerNorm2: string;
  readonly fc1: string;
  readonly fc2: string;
}

export interface ClipNames {
  readonly tokenEmbedding: string;
  /** The tensor [contextLength, width]. */
  readonly positionEmbedding: string;
  /** Layer i is `${layers}.${i}`. */
  readonly layers: string;
  readonly layer: ClipLayerNames;
  readonly finalLayerNorm: string;
  /** The tensor [width, projectionDim] that projects the pooled feature, or null where the naming has none. */
  readonly textProjection: string | null;
}

/** Hugging Face transformers' CLIPTextModel (`text_model.*`), as SD 1.x and SDXL's first encoder store it. */
export const HF_CLIP_NAMES: ClipNames = Object.freeze({
  tokenEmbedding: 'embeddings.token_embedding',
  positionEmbedding: 'embeddings.position_embedding.weight',
  layers: 'encoder.layers',
  layer: Object.freeze({
    layerNorm1: 'layer_norm1',
    qkv: Object.freeze(['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'] as const),
    outProj: 'self_attn.out_proj',
    layerNorm2: 'layer_norm2',
    fc1: 'mlp.fc1',
    fc2: 'mlp.fc2',
  }),
  finalLayerNorm: 'final_layer_norm',
  textProjection: null,
});

/** open_clip's text tower (`TextTransformer` / `CLIP` text attributes), as SDXL's second encoder stores it. */
export const OPEN_CLIP_NAMES: ClipNames = Object.freeze({
  tokenEmbedding: 'token_embedding',
  positionEmbedding: 'positional_embedding',
  layers: 'transformer.resblocks',
  layer: Object.freeze({
    layerNorm1: 'ln_1',
    qkv: Object.freeze({ packed: 'attn.in_proj' }),
    outProj: 'attn.out_proj',
    layerNorm2: 'ln_2',
    fc1: 'mlp.c_fc',
    fc2: 'mlp.c_proj',
  }),
  finalLayerNorm: 'ln_final',
  textProjection: 'text_projection',
});
