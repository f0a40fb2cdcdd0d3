/**
 * The one import of TensorFlow.js for the whole engine. Backends are registered by ./backend.ts.
 */
export * from '@tensorflow/tfjs-core';
