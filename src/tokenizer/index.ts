/** CLIP byte-level BPE tokenizer (SD 1.x, both of SDXL's): the public surface. */
export { ClipTokenizer, OPEN_CLIP_PAD_ID, preTokenize, type EncodeOptions } from './tokenizer.js';
export { TokenizerError } from './errors.js';
export { findTokenizer, locateTokenizer, BPE_GZ_NAME, type TokenizerFiles } from './locate.js';
export { cleanText } from './clean.js';
export { START_OF_TEXT, END_OF_TEXT } from './vocab.js';
