/** IP-Adapter (tencent-ailab): preprocessing, image projections, the adapter file and its UNet attachment. */
export { IpAdapter, type ImageFeatures, type IpAdapterKind, type IpLayer } from './adapter.js';
export { ImageProjModel } from './image-proj.js';
export { Resampler } from './resampler.js';
export { CLIP_MEAN, CLIP_STD, decodePhoto, preprocessClipImage, shortestSideSize, type Photo, type Preprocessed } from './preprocess.js';
export { resizeBicubicPillow } from './resize.js';
export { ipAdapterTokens, loadImageEncoder } from './tokens.js';
