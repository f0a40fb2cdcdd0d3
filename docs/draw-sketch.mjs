// Draws docs/sketch.png, the README's "Sketch to illustration" input: a fern frond in black ink on white, 256x256,
// from an SVG made here (a stem and pairs of leaflets getting smaller to the tip). Run: node docs/draw-sketch.mjs
import sharp from 'sharp';

const leaflets = [];
for (let i = 0; i < 9; i++) {
  const y = 220 - i * 21;
  const len = 70 - i * 7;
  const x = 128 + Math.sin(i / 3) * 6;
  for (const side of [-1, 1]) {
    const tip = x + side * len;
    leaflets.push(`<path d="M ${x} ${y} Q ${x + side * len * 0.5} ${y - 22} ${tip} ${y - 12} Q ${x + side * len * 0.5} ${y + 4} ${x} ${y}" />`);
  }
}
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256">
  <rect width="256" height="256" fill="white"/>
  <g fill="none" stroke="black" stroke-width="3" stroke-linecap="round">
    <path d="M 128 246 C 122 180, 136 90, 130 22" />
    ${leaflets.join('\n    ')}
  </g>
</svg>`;
await sharp(Buffer.from(svg)).flatten({ background: '#ffffff' }).png().toFile(new URL('./sketch.png', import.meta.url).pathname);
console.log('wrote docs/sketch.png');
