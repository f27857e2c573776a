// Needle heatmaps as in the paper: x = context length, y = needle depth (0 % at the top), colour =
// score on a red → yellow → green scale. Drawn as SVG, rendered to PNG by resvg (prebuilt, no
// install scripts; system fonts). resvg measures no text for us, so the layout sizes text by an
// upper bound of its width (textWidth) and wraps the caption to the canvas.
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

/**
 * Width of `text` at `fontSize` px, from above: DejaVu Sans advances digits by 0.64 em and most
 * letters by less (an English caption renders at ~0.5 em a character), so 0.65 em each is a bound.
 */
export function textWidth(text: string, fontSize: number): number {
  return [...text].length * fontSize * 0.65;
}

/** `text` broken at spaces into lines no wider than `width` (a longer word gets a line of its own). */
export function wrapText(text: string, fontSize: number, width: number): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(" ")) {
    const next = line === "" ? word : `${line} ${word}`;
    if (line !== "" && textWidth(next, fontSize) > width) {
      lines.push(line);
      line = word;
    } else line = next;
  }
  if (line !== "") lines.push(line);
  return lines;
}

/**
 * Which of `n` evenly spaced ticks `pitch` px apart get a label `size` px long (along the axis):
 * every k-th so that neighbours do not touch, the first and the last always.
 */
export function tickIndices(n: number, pitch: number, size: number): number[] {
  if (n <= 0) return [];
  const step = Math.max(1, Math.ceil((size + 3) / pitch));
  const out: number[] = [];
  for (let i = 0; i < n; i += step) out.push(i);
  if (out.at(-1) !== n - 1) {
    if (out.length > 1 && n - 1 - out.at(-1)! < step) out.pop();
    out.push(n - 1);
  }
  return out;
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const fmt = (v: number) => String(Math.round(v * 10) / 10);

function text(cls: string, x: number, y: number, size: number, body: string, anchor = "start"): string {
  return `<text class="${cls}" x="${fmt(x)}" y="${fmt(y)}" font-size="${size}" text-anchor="${anchor}">${esc(body)}</text>`;
}

const axes = (cells: HeatCell[]) => ({
  lengths: [...new Set(cells.map((c) => c.length))].sort((a, b) => a - b),
  depths: [...new Set(cells.map((c) => c.depth))].sort((a, b) => a - b),
});

/** Widest depth label at `fontSize`, plus its gap to the tiles. */
const depthLabelWidth = (cells: HeatCell[], fontSize: number) =>
  Math.max(0, ...axes(cells).depths.map((d) => textWidth(String(d), fontSize))) + 4;

interface Panel {
  title: string;
  cells: HeatCell[];
  /** top-left corner of the tiles and their size, px */
  x: number;
  y: number;
  w: number;
  h: number;
  titleSize: number;
  tickSize: number;
}

/** One heatmap: title, tiles, and its own ticks (lengths below, depths left), in absolute coordinates. */
function panel(p: Panel): string {
  const { lengths, depths } = axes(p.cells);
  const cw = p.w / Math.max(1, lengths.length);
  const ch = p.h / Math.max(1, depths.length);
  const mean = p.cells.reduce((a, c) => a + c.score, 0) / Math.max(1, p.cells.length);
  const out = [
    `<g class="panel">`,
    text("title", p.x + p.w / 2, p.y - 8, p.titleSize, `${p.title} (mean ${mean.toFixed(2)})`, "middle"),
  ];
  for (const c of p.cells) {
    const i = lengths.indexOf(c.length);
    const j = depths.indexOf(c.depth);
    out.push(
      `<rect x="${fmt(p.x + i * cw)}" y="${fmt(p.y + j * ch)}" width="${fmt(cw)}" height="${fmt(ch)}" ` +
        `fill="${scoreColour(c.score)}" stroke="white" stroke-width="0.5"/>`,
    );
  }
  const widest = Math.max(0, ...lengths.map((l) => textWidth(String(l), p.tickSize)));
  for (const i of tickIndices(lengths.length, cw, widest)) {
    const x = p.x + (i + 0.5) * cw;
    out.push(text("tick-x", x, p.y + p.h + p.tickSize + 3, p.tickSize, String(lengths[i]), "middle"));
  }
  for (const j of tickIndices(depths.length, ch, p.tickSize)) {
    const y = p.y + (j + 0.5) * ch + p.tickSize * 0.35;
    out.push(text("tick-y", p.x - 3, y, p.tickSize, String(depths[j]), "end"));
  }
  out.push("</g>");
  return out.join("");
}

function legend(x: number, y: number, h: number): string {
  const steps = 20;
  const parts = [`<g class="legend">`];
  for (let k = 0; k < steps; k++) {
    parts.push(
      `<rect x="${x}" y="${fmt(y + (k * h) / steps)}" width="12" height="${fmt(h / steps + 0.5)}" fill="${scoreColour(1 - k / (steps - 1))}"/>`,
    );
  }
  parts.push(text("legend", x + 16, y + 8, 10, "1.0"), text("legend", x + 16, y + h, 10, "0.0"));
  parts.push(text("legend", x + 16, y + h / 2 + 3, 10, "score"), "</g>");
  return parts.join("");
}

/** Legend width: the bar, its gap, and "score" at 10 px. */
const LEGEND_WIDTH = 16 + textWidth("score", 10);

const wrap = (w: number, h: number, body: string) =>
  `<svg xmlns="http://www.w3.org/2000/svg" width="${Math.ceil(w)}" height="${Math.ceil(h)}" font-family="DejaVu Sans, sans-serif">` +
  `<rect width="100%" height="100%" fill="white"/>${body}</svg>`;

export function heatmapSvg(title: string, cells: HeatCell[]): string {
  const left = 60;
  const body =
    panel({ title, cells, x: left, y: 30, w: 380, h: 300, titleSize: 14, tickSize: 10 }) +
    text("axis", left + 190, 30 + 300 + 30, 11, "context length (tokens)", "middle") +
    `<text class="axis" transform="translate(${left - depthLabelWidth(cells, 10) - 12},${30 + 150}) rotate(-90)" ` +
    `text-anchor="middle" font-size="11">depth (%)</text>` +
    legend(460, 30, 300);
  return wrap(520, 380, body);
}

/**
 * Tiles of every (method, budget), one row per method, one column per budget, each with its own
 * ticks; the caption under them, wrapped to the canvas.
 */
export function overviewSvg(tiles: { row: number; col: number; title: string; cells: HeatCell[] }[]): string {
  const rows = Math.max(1, ...tiles.map((t) => t.row + 1));
  const cols = Math.max(1, ...tiles.map((t) => t.col + 1));
  const all = tiles.flatMap((t) => t.cells);
  const [tw, th, tick, pad, gap] = [170, 120, 8, 20, 20];
  const yLabels = depthLabelWidth(all, tick);
  const colPitch = yLabels + tw + gap;
  const rowPitch = 22 + th + tick + 8; // title above, tiles, length ticks below
  const top = 30;
  const body = tiles.map((t) =>
    panel({
      ...t,
      x: pad + yLabels + t.col * colPitch,
      y: top + t.row * rowPitch,
      w: tw,
      h: th,
      titleSize: 11,
      tickSize: tick,
    }),
  );
  const gridRight = pad + cols * colPitch - gap;
  const w = Math.max(gridRight + gap + LEGEND_WIDTH + pad, 420);
  const { lengths, depths } = axes(all);
  const span = (xs: number[]) => (xs[0] === xs.at(-1) ? `${xs[0]}` : `${xs[0]}–${xs.at(-1)}`);
  const caption =
    `x: context length in tokens (${span(lengths)}), left to right; ` +
    `y: needle depth in % (${span(depths)}), top to bottom; colour: score 0–1`;
  const captionSize = 11;
  const lines = wrapText(caption, captionSize, w - 2 * pad);
  const gridBottom = top + rows * rowPitch - 22;
  lines.forEach((line, i) => {
    body.push(text("caption", pad, gridBottom + 10 + (i + 1) * (captionSize + 4), captionSize, line));
  });
  const h = gridBottom + 10 + lines.length * (captionSize + 4) + 10;
  return wrap(w, h, `${body.join("")}${legend(gridRight + gap, top, th)}`);
}

export function svgToPng(svg: string): Buffer {
  return Buffer.from(
    new Resvg(svg, { font: { loadSystemFonts: true, defaultFontFamily: "DejaVu Sans" } }).render().asPng(),
  );
}
