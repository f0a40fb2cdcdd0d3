/**
 * The one import of TensorFlow.js for the whole engine. Backends are chosen by ./select.ts; the plain-JavaScript cpu
 * backend is registered here as well, so that there is always one: code that makes tensors before a backend is
 * chosen (expectedShapes runs a model's loader against a probe, which makes empty tensors) works in any process.
 */
import '@tensorflow/tfjs-backend-cpu';

export * from '@tensorflow/tfjs-core';
