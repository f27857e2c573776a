// Needle heatmaps as in the paper: x = context length, y = needle depth (0 % at the top), colour =
// score on a red → yellow → green scale. Drawn as SVG, rendered to PNG by resvg (prebuilt, no
// install scripts; system fonts).
import { Resvg } from "@resvg/resvg-js";

export interface HeatCell {
  length: number;
  depth: number;
  score: number;
}

const STOPS: [number, [number, number, number]][] = [
  [0, [240, 73, 110]], // red
  [0.5, [235, 184, 57]], // yellow
  [1, [12, 215, 159]], // green
];

/** Colour of a score in [0, 1] on the red → yellow → green scale. */
export function scoreColour(score: number): string {
  const s = Math.min(1, Math.max(0, score));
  let i = 0;
  while (i < STOPS.length - 2 && s > STOPS[i + 1]![0]) i++;
  const [a, ca] = STOPS[i]!;
  const [b, cb] = STOPS[i + 1]!;
  const t = (s - a) / (b - a);
  const c = ca.map((x, k) => Math.round(x + (cb[k]! - x) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

/** One heatmap as an SVG fragment at (x, y); `compact` omits tick labels (overview tiles). */
function heatmapGroup(
  title: string,
  cells: HeatCell[],
  x: number,
  y: number,
  w: number,
  h: number,
  compact: boolean,
): string {
  const lengths = [...new Set(cells.map((c) => c.length))].sort((a, b) => a - b);
  const depths = [...new Set(cells.map((c) => c.depth))].sort((a, b) => a - b);
  const cw = w / Math.max(1, lengths.length);
  const ch = h / Math.max(1, depths.length);
  const mean = cells.reduce((a, c) => a + c.score, 0) / Math.max(1, cells.length);
  const out: string[] = [`<g transform="translate(${x},${y})">`];
  out.push(
    `<text x="${w / 2}" y="-8" text-anchor="middle" font-size="${compact ? 11 : 14}">${esc(title)} (mean ${mean.toFixed(2)})</text>`,
  );
  for (const c of cells) {
    const i = lengths.indexOf(c.length);
    const j = depths.indexOf(c.depth);
    out.push(
      `<rect x="${(i * cw).toFixed(1)}" y="${(j * ch).toFixed(1)}" width="${cw.toFixed(1)}" height="${ch.toFixed(1)}" ` +
        `fill="${scoreColour(c.score)}" stroke="white" stroke-width="0.5"/>`,
    );
  }
  if (!compact) {
    for (const [i, l] of lengths.entries()) {
      out.push(`<text x="${(i + 0.5) * cw}" y="${h + 14}" text-anchor="middle" font-size="10">${l}</text>`);
    }
    for (const [j, d] of depths.entries()) {
      out.push(`<text x="-4" y="${(j + 0.5) * ch + 3}" text-anchor="end" font-size="10">${d}</text>`);
    }
    out.push(`<text x="${w / 2}" y="${h + 30}" text-anchor="middle" font-size="11">context length (tokens)</text>`);
    out.push(
      `<text transform="translate(-34,${h / 2}) rotate(-90)" text-anchor="middle" font-size="11">depth (%)</text>`,
    );
  }
  out.push("</g>");
  return out.join("");
}

function legend(x: number, y: number, h: number): string {
  const steps = 20;
  const parts = [`<g transform="translate(${x},${y})">`];
  for (let k = 0; k < steps; k++) {
    parts.push(
      `<rect x="0" y="${(k * h) / steps}" width="12" height="${h / steps + 0.5}" fill="${scoreColour(1 - k / (steps - 1))}"/>`,
    );
  }
  parts.push(
    `<text x="16" y="8" font-size="10">1.0</text><text x="16" y="${h}" font-size="10">0.0</text><text x="16" y="${h / 2 + 3}" font-size="10">score</text></g>`,
  );
  return parts.join("");
}

const wrap = (w: number, h: number, body: string) =>
  `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-family="DejaVu Sans, sans-serif">` +
  `<rect width="100%" height="100%" fill="white"/>${body}</svg>`;

export function heatmapSvg(title: string, cells: HeatCell[]): string {
  return wrap(520, 380, heatmapGroup(title, cells, 60, 30, 380, 300, false) + legend(460, 30, 300));
}

/** Tiles of every (method, budget), one row per method, one column per budget. */
export function overviewSvg(tiles: { row: number; col: number; title: string; cells: HeatCell[] }[]): string {
  const rows = Math.max(1, ...tiles.map((t) => t.row + 1));
  const cols = Math.max(1, ...tiles.map((t) => t.col + 1));
  const tw = 170;
  const th = 120;
  const body = tiles
    .map((t) => heatmapGroup(t.title, t.cells, 20 + t.col * (tw + 20), 30 + t.row * (th + 32), tw, th, true))
    .join("");
  const w = 20 + cols * (tw + 20) + 50;
  const all = tiles.flatMap((t) => t.cells);
  const lengths = all.map((c) => c.length);
  const caption =
    `x: context length ${Math.min(...lengths)}–${Math.max(...lengths)} tokens, left to right; ` +
    `y: needle depth 0–100 %, top to bottom`;
  const h = 30 + rows * (th + 32);
  return wrap(w, h + 16, `${body}${legend(w - 50, 30, th)}<text x="20" y="${h + 4}" font-size="11">${caption}</text>`);
}

export function svgToPng(svg: string): Buffer {
  return Buffer.from(
    new Resvg(svg, { font: { loadSystemFonts: true, defaultFontFamily: "DejaVu Sans" } }).render().asPng(),
  );
}
