// Turn a drawing, an uploaded image or a camera frame into the model's input tensor, following the
// package's recorded preprocessing (keiryo/app/imaging.py turns the manifest into the `spec` used here).
//
// spec: {channels, height, width, fit: "stretch" | "crop" | "bbox", resize, grid, levels, ink,
//        channel_order: "RGB" | "BGR" | "grey", mean, std}
//   - fit "bbox" (the digits source): the ink's bounding box is centred in a grid*4 square (aspect kept),
//     averaged over 4x4 blocks to grid x grid and quantised to `levels` (the UCI digits are made so), then
//     resized bilinearly (PyTorch's align_corners=False) to height x width;
//   - fit "stretch": resized to width x height; "crop": shorter side to `resize`, then a centred crop.

const scratch = () => {
  const c = typeof OffscreenCanvas !== "undefined" ? new OffscreenCanvas(1, 1) : document.createElement("canvas");
  return c;
};

function sizeOf(source) {
  const w = source.videoWidth || source.naturalWidth || source.width;
  const h = source.videoHeight || source.naturalHeight || source.height;
  return [w, h];
}

function pixels(source, sx, sy, sw, sh, w, h, background) {
  const c = scratch();
  c.width = w;
  c.height = h;
  const g = c.getContext("2d", { willReadFrequently: true });
  g.imageSmoothingEnabled = true;
  g.imageSmoothingQuality = "high";
  if (background) {
    g.fillStyle = background;
    g.fillRect(0, 0, w, h);
  }
  g.drawImage(source, sx, sy, sw, sh, 0, 0, w, h);
  return g.getImageData(0, 0, w, h).data;
}

// bilinear resize of one channel, PyTorch F.interpolate(mode="bilinear", align_corners=False) semantics
export function resizeBilinear(src, sh, sw, dh, dw) {
  if (sh === dh && sw === dw) return Float32Array.from(src);
  const out = new Float32Array(dh * dw);
  const ry = sh / dh;
  const rx = sw / dw;
  for (let y = 0; y < dh; y++) {
    let fy = (y + 0.5) * ry - 0.5;
    if (fy < 0) fy = 0;
    const y0 = Math.min(Math.floor(fy), sh - 1);
    const y1 = Math.min(y0 + 1, sh - 1);
    const wy = fy - y0;
    for (let x = 0; x < dw; x++) {
      let fx = (x + 0.5) * rx - 0.5;
      if (fx < 0) fx = 0;
      const x0 = Math.min(Math.floor(fx), sw - 1);
      const x1 = Math.min(x0 + 1, sw - 1);
      const wx = fx - x0;
      const top = src[y0 * sw + x0] * (1 - wx) + src[y0 * sw + x1] * wx;
      const bot = src[y1 * sw + x0] * (1 - wx) + src[y1 * sw + x1] * wx;
      out[y * dw + x] = Math.min(1, Math.max(0, top * (1 - wy) + bot * wy));
    }
  }
  return out;
}

function luminance(rgba, n) {
  const g = new Float32Array(n);
  for (let i = 0; i < n; i++) g[i] = (0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]) / 255;
  return g;
}

// digits-style input: ink (1) on background (0), bounding box centred, block-averaged, quantised
function inkInput(source, spec, drawn) {
  const [w, h] = sizeOf(source);
  const n = w * h;
  const lum = luminance(pixels(source, 0, 0, w, h, w, h, "#fff"), n);
  let mean = 0;
  for (let i = 0; i < n; i++) mean += lum[i];
  mean /= n;
  // drawings are dark ink on white; an upload or a frame may be either way round: the background is the majority
  const invert = drawn || mean > 0.5;
  const ink = new Float32Array(n);
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = invert ? 1 - lum[y * w + x] : lum[y * w + x];
      ink[y * w + x] = v;
      if (v > 0.15) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  const grid = spec.grid || spec.height;
  const box = grid * 4;
  const square = new Float32Array(box * box);
  if (x1 >= 0) {
    // the ink's box, scaled so its longer side fills the square, centred (aspect kept)
    const bw = x1 - x0 + 1, bh = y1 - y0 + 1;
    const s = box / Math.max(bw, bh);
    const c = scratch();
    c.width = w;
    c.height = h;
    const g = c.getContext("2d", { willReadFrequently: true });
    const img = g.createImageData(w, h);
    for (let i = 0; i < n; i++) {
      const v = Math.round(ink[i] * 255);
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
      img.data[4 * i + 3] = 255;
    }
    g.putImageData(img, 0, 0);
    const tw = Math.max(1, Math.round(bw * s)), th = Math.max(1, Math.round(bh * s));
    const dx = Math.floor((box - tw) / 2), dy = Math.floor((box - th) / 2);
    const d = scratch();
    d.width = box;
    d.height = box;
    const dg = d.getContext("2d", { willReadFrequently: true });
    dg.fillStyle = "#000";
    dg.fillRect(0, 0, box, box);
    dg.imageSmoothingEnabled = true;
    dg.imageSmoothingQuality = "high";
    dg.drawImage(c, x0, y0, bw, bh, dx, dy, tw, th);
    const px = dg.getImageData(0, 0, box, box).data;
    for (let i = 0; i < box * box; i++) square[i] = px[4 * i] / 255;
  }
  const small = new Float32Array(grid * grid);
  const levels = spec.levels || 0;
  for (let by = 0; by < grid; by++) {
    for (let bx = 0; bx < grid; bx++) {
      let s = 0;
      for (let y = 0; y < 4; y++) for (let x = 0; x < 4; x++) s += square[(by * 4 + y) * box + bx * 4 + x];
      let v = s / 16;
      if (levels) v = Math.round(v * levels) / levels;
      small[by * grid + bx] = v;
    }
  }
  const one = resizeBilinear(small, grid, grid, spec.height, spec.width);
  const out = new Float32Array(spec.channels * spec.height * spec.width);
  for (let c = 0; c < spec.channels; c++) out.set(one, c * one.length);
  return out;
}

function imageInput(source, spec) {
  const [w, h] = sizeOf(source);
  let sx = 0, sy = 0, sw = w, sh = h;
  if (spec.fit === "crop") {
    // shorter side to `resize`, then a centred height x width crop: the same region of the source
    const s = (spec.resize || Math.min(spec.height, spec.width)) / Math.min(w, h);
    sw = Math.min(w, spec.width / s);
    sh = Math.min(h, spec.height / s);
    sx = (w - sw) / 2;
    sy = (h - sh) / 2;
  }
  const rgba = pixels(source, sx, sy, sw, sh, spec.width, spec.height, "#fff");
  const n = spec.width * spec.height;
  const out = new Float32Array(spec.channels * n);
  const order = spec.channel_order === "BGR" ? [2, 1, 0] : [0, 1, 2];
  for (let c = 0; c < spec.channels; c++) {
    const mean = spec.mean ? spec.mean[c] : 0;
    const std = spec.std ? spec.std[c] : 1;
    for (let i = 0; i < n; i++) {
      const v = spec.channels === 1
        ? (0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]) / 255
        : rgba[4 * i + order[c]] / 255;
      out[c * n + i] = (v - mean) / std;
    }
  }
  return out;
}

// -> Float32Array in (channels, height, width) order; `drawn`: the source is the drawing canvas
export function preprocess(source, spec, drawn = false) {
  const [w, h] = sizeOf(source);
  if (!w || !h) throw new Error("the image is empty");
  return spec.fit === "bbox" ? inkInput(source, spec, drawn) : imageInput(source, spec);
}
