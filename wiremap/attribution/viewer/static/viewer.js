// wiremap viewer: draws an attribution graph JSON (DESIGN.md section 8) as SVG.
// Served by `wiremap serve DIR`, or inlined with the graph by wiremap.attribution.html
// (then the page has a <script id="wiremap-graph"> holding the graph, and no server).
// Plain JS, no build step, no third-party code.
//
// Sized for real-model graphs (~1,000 features, ~20,000 links): the adjacency and the order
// in which links are drawn are computed once per graph; the drawn links are a handful of SVG
// <path>s (one per sign and width class) rather than an element each; hovering a node draws
// only its own links on top; one set of listeners on the node layer serves every node.
// S.timings holds the last render / hover / click times (performance.now(), ms).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const ROW_H = 56;
const MIN_COL_W = 70;   // px for a position with few nodes (room for its token label)
const NODE_STEP = 12;  // px per node in a crowded cell
const MIN_NODE_STEP = 4;  // ... squeezed to no less than this when the graph is too wide
const MARGIN = { left: 70, right: 30, top: 40, bottom: 50 };
const MAX_EDGES = 8000; // links drawn at once: every node's strongest first (see adjacency)
const MAX_HOVER_EDGES = 300; // per direction, the strongest links of a hovered node
const WIDTH_CLASSES = 8; // drawn links share one <path> per sign and width class
const MAX_BOX_W = 124; // px, the widest token/logit box
const LOGIT_STAGGER = 22; // px a crowded row of logit boxes raises every other box
const SN_COLOURS = ["#e6550d", "#31a354", "#756bb1", "#d6616b", "#3182bd", "#8c6d31"];

const S = {
  embedded: false, name: null, graph: null, byId: new Map(), kind: new Map(),
  incoming: new Map(), outgoing: new Map(), pinned: [], supernodes: [], labels: {},
  ticked: new Set(), clicked: null, heads: new Map(), threshold: 0.8, showErrors: true, pos: new Map(),
  nodeEls: new Map(), dirty: false, linkOrder: [], drawnLinks: [], maxWeight: 1e-12,
  drawn: { nodes: 0, edges: 0 }, timings: {},
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const ns = ["svg", "g", "line", "circle", "polygon", "rect", "text", "path", "title"];
  const node = ns.includes(tag) ? document.createElementNS(SVGNS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function status(msg, isError) {
  const s = $("status");
  s.textContent = msg;
  s.className = isError ? "error" : "";
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const resp = await fetch(path, opts);
  let data;
  try { data = await resp.json(); } catch (e) { data = { error: resp.statusText }; }
  if (!resp.ok) throw new Error(data.error || resp.statusText);
  return data;
}

// ---- graph model ------------------------------------------------------------------------
const KINDS = { embedding: "token", logit: "logit", "mlp reconstruction error": "error" };
const kindOf = (n) => KINDS[n.feature_type] || "feature";

function setGraph(name, graph) {
  S.name = name; S.graph = graph; S.byId = new Map(); S.kind = new Map();
  S.incoming = new Map(); S.outgoing = new Map(); S.labels = {}; S.ticked = new Set();
  for (const n of graph.nodes) {
    S.byId.set(n.node_id, n); S.kind.set(n.node_id, kindOf(n));
    S.incoming.set(n.node_id, []); S.outgoing.set(n.node_id, []);
  }
  adjacency(graph.links);
  indexHeads(graph);
  const q = graph.qParams || {};
  S.pinned = (q.pinnedIds || []).filter((id) => S.byId.has(id));
  S.supernodes = (q.supernodes || []).map((g) => g.slice());
  S.clicked = S.byId.has(q.clickedId) ? q.clickedId : null;
  S.dirty = false;
  $("prompt").textContent = graph.metadata.prompt || "";
  render(); renderPinned(); showNode(S.clicked); updateScores();
  S.timings.ready = performance.now(); // since navigation: fetch/parse + first render
}

// Precomputed once per graph: each node's links, strongest first, and S.linkOrder, the
// links ranked as wiremap.attribution.budget ranks them: a link's rank is the better of
// its rank among its target's inputs and among its source's outputs (by |weight|), so
// drawing a prefix of this order gives every node its strongest links first. Index arrays
// and typed arrays keep this fast at 200,000 links.
function adjacency(links) {
  const n = links.length, absW = new Float64Array(n), rank = new Int32Array(n);
  const inIdx = new Map(), outIdx = new Map();
  for (const id of S.byId.keys()) { inIdx.set(id, []); outIdx.set(id, []); }
  links.forEach((l, i) => {
    absW[i] = Math.abs(l.weight);
    inIdx.get(l.target).push(i); outIdx.get(l.source).push(i);
  });
  rank.fill(2147483647);
  const byWeight = (a, b) => absW[b] - absW[a] || a - b;
  for (const [lists, adj] of [[inIdx, S.incoming], [outIdx, S.outgoing]]) {
    for (const [id, list] of lists) {
      list.sort(byWeight);
      list.forEach((i, r) => { if (r < rank[i]) rank[i] = r; });
      adj.set(id, list.map((i) => links[i]));
    }
  }
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => rank[a] - rank[b] || byWeight(a, b));
  S.linkOrder = order.map((i) => links[i]);
  S.maxWeight = absW.reduce((m, w) => Math.max(m, w), 1e-12);
}

function labelOf(n) {
  if (S.labels[n.node_id] !== undefined) return S.labels[n.node_id];
  if (n.clerp) return n.clerp;
  const k = kindOf(n);
  if (k === "token") return tokenText(n);
  if (k === "error") return `error L${n.layer} @${n.ctx_idx}`;
  return `L${n.layer} #${n.node_id.split("_")[1]}`;
}

function tokenText(n) {
  const toks = S.graph.metadata.prompt_tokens || [];
  return toks[n.ctx_idx] !== undefined ? toks[n.ctx_idx] : n.node_id;
}

function visible(n) {
  const k = kindOf(n);
  if (k === "token" || k === "logit" || S.pinned.includes(n.node_id)) return true;
  if (k === "error" && !S.showErrors) return false;
  return n.influence === undefined || n.influence === null || n.influence <= S.threshold;
}

// ---- layout: x = token position, y = layer (embeddings at the bottom, logits on top) ------
function layout(nodes) {
  const numeric = nodes.filter((n) => ["feature", "error"].includes(kindOf(n)))
    .map((n) => parseInt(n.layer, 10)).filter((v) => !isNaN(v));
  const nLayers = numeric.length ? Math.max(...numeric) + 1 : 0;
  const nPos = Math.max((S.graph.metadata.prompt_tokens || []).length,
    ...S.graph.nodes.map((n) => (n.ctx_idx || 0) + 1));
  const rowOf = (n) => {
    const k = kindOf(n);
    if (k === "token") return 0;
    if (k === "logit") return nLayers + 1;
    return parseInt(n.layer, 10) + 1;
  };
  const cells = new Map();
  for (const n of nodes) {
    const key = `${rowOf(n)},${n.ctx_idx || 0}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const nRows = nLayers + 2;
  const wrap = $("graph-wrap");
  const colW = columnWidths(cells, nPos, wrap.clientWidth - MARGIN.left - MARGIN.right - 4);
  const colX = [MARGIN.left];
  colW.forEach((w, p) => colX.push(colX[p] + w));
  const fitH = (wrap.clientHeight - MARGIN.top - MARGIN.bottom - 4) / Math.max(1, nRows - 1);
  const rowH = Math.min(120, Math.max(ROW_H, fitH || 0));
  const pos = new Map();
  const width = colX[nPos] + MARGIN.right;
  for (const [key, cell] of cells) {
    const [row, col] = key.split(",").map(Number);
    cell.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0));
    // logit boxes carry text: give each room, spilling left of the last column if needed;
    // closer than a box's widest (MAX_BOX_W), every other box is raised so none overlap
    const inner = colW[col] / (cell.length + 1);
    const isLogits = row === nRows - 1;
    const step = isLogits ? Math.max(inner, 84) : inner;
    const stagger = isLogits && step < MAX_BOX_W + 4 ? LOGIT_STAGGER : 0;
    const centre = colX[col] + colW[col] / 2;
    const shift = Math.min(0, width - MARGIN.right - 40 - (centre + (step * (cell.length - 1)) / 2));
    cell.forEach((n, i) => pos.set(n.node_id, {
      x: centre + shift + (i - (cell.length - 1) / 2) * step,
      y: MARGIN.top + (nRows - 1 - row) * rowH - (i % 2) * stagger,
    }));
  }
  const height = MARGIN.top + (nRows - 1) * rowH + MARGIN.bottom;
  return { pos, width, height, nLayers, nPos, colW, colX, nRows, rowH };
}

// Each position is as wide as its most crowded cell needs (a token with many features gets a
// wide column, the others stay narrow). Spare room in the visible area is shared out evenly;
// when the graph is too wide, crowded columns are squeezed (down to MIN_NODE_STEP per node).
function columnWidths(cells, nPos, available) {
  const need = new Array(nPos).fill(MIN_COL_W);
  for (const [key, cell] of cells) {
    const col = Number(key.split(",")[1]);
    need[col] = Math.max(need[col], cell.length * NODE_STEP);
  }
  const base = nPos * MIN_COL_W;
  const total = need.reduce((a, b) => a + b, 0);
  if (!available || total === base) return need;
  if (total <= available) return need.map((w) => w + (available - total) / nPos);
  const squeeze = Math.max(MIN_NODE_STEP / NODE_STEP, (available - base) / (total - base));
  return need.map((w) => MIN_COL_W + (w - MIN_COL_W) * squeeze);
}

// ---- drawing ----------------------------------------------------------------------------
function render() {
  const t0 = performance.now();
  const svg = $("graph");
  svg.replaceChildren();
  svg.classList.remove("hovering"); // the hovered node may be gone; the next mouseover says
  const nodes = S.graph.nodes.filter(visible);
  const L = layout(nodes);
  S.pos = L.pos;
  svg.setAttribute("width", L.width); svg.setAttribute("height", L.height);
  svg.setAttribute("viewBox", `0 0 ${L.width} ${L.height}`);
  drawAxes(svg, L);
  drawEdges(svg, nodes);
  svg.append(el("g", { class: "hl-edges" }));
  drawNodes(svg, nodes);
  drawSupernodeLabels(svg);
  S.drawn.nodes = nodes.length;
  S.timings.render = performance.now() - t0;
}

function drawAxes(svg, L) {
  const g = el("g", { class: "axes" });
  for (let r = 0; r < L.nRows; r++) {
    const y = MARGIN.top + (L.nRows - 1 - r) * L.rowH;
    const name = r === 0 ? "Emb" : r === L.nRows - 1 ? "Logit" : `L${r - 1}`;
    g.append(el("line", { x1: MARGIN.left, x2: L.width - MARGIN.right, y1: y, y2: y, class: "grid" }));
    g.append(el("text", { x: 8, y: y + 4, class: "axis-label" }, name));
  }
  for (let p = 0; p < L.nPos; p++) { // token text sits in the embedding boxes; here the index
    const x = L.colX[p] + L.colW[p] / 2;
    g.append(el("text", { x, y: L.height - 18, class: "axis-label", "text-anchor": "middle" }, `${p}`));
  }
  svg.append(g);
}

const widthOf = (l) => 0.4 + 3.6 * Math.abs(l.weight) / S.maxWeight;

// The first MAX_EDGES links of S.linkOrder between shown nodes, as one <path> per sign and
// width class: a few elements however many links, so rendering and restyling stay cheap.
function drawEdges(svg, nodes) {
  const shown = new Set(nodes.map((n) => n.node_id));
  const paths = new Map();
  let count = 0;
  S.drawnLinks = [];
  for (const l of S.linkOrder) {
    if (count >= MAX_EDGES) break;
    if (!shown.has(l.source) || !shown.has(l.target)) continue;
    const a = S.pos.get(l.source), b = S.pos.get(l.target);
    const cls = Math.min(WIDTH_CLASSES - 1, Math.floor(Math.abs(l.weight) / S.maxWeight * WIDTH_CLASSES));
    const key = `${l.weight >= 0 ? "pos" : "neg"} ${cls}`;
    if (!paths.has(key)) paths.set(key, []);
    paths.get(key).push(`M${a.x.toFixed(1)} ${a.y.toFixed(1)}L${b.x.toFixed(1)} ${b.y.toFixed(1)}`);
    S.drawnLinks.push(l);
    count++;
  }
  const g = el("g", { class: "edges" });
  const keys = [...paths.keys()].sort((a, b) => +a.split(" ")[1] - +b.split(" ")[1]);
  for (const key of keys) { // thickest drawn last, on top
    const [sign, cls] = key.split(" ");
    g.append(el("path", { class: `edge-set ${sign}`, d: paths.get(key).join(""),
      "stroke-width": (0.4 + 3.6 * (+cls + 0.5) / WIDTH_CLASSES).toFixed(2) }));
  }
  S.drawn.edges = count;
  svg.append(g);
}

function drawNodes(svg, nodes) {
  const g = el("g", { class: "nodes" });
  S.nodeEls = new Map();
  const inSn = supernodeOfMap();
  const pinned = new Set(S.pinned);
  for (const n of nodes) {
    const p = S.pos.get(n.node_id), k = kindOf(n);
    const ng = el("g", { class: `node ${k}`, "data-id": n.node_id,
      transform: `translate(${p.x},${p.y})` });
    if (pinned.has(n.node_id)) ng.classList.add("pinned");
    if (S.clicked === n.node_id) ng.classList.add("clicked");
    if (inSn.has(n.node_id)) {
      ng.append(el("circle", { r: 10, class: "sn-ring", stroke: inSn.get(n.node_id).colour }));
    }
    ng.append(nodeShape(n, k));
    ng.append(el("title", {}, `${labelOf(n)}\n${n.node_id}`));
    S.nodeEls.set(n.node_id, ng);
    g.append(ng);
  }
  // one set of listeners for every node (a thousand closures cost more than the drawing)
  const idOf = (ev) => ev.target.closest && ev.target.closest(".node")?.dataset.id;
  g.addEventListener("mouseover", (ev) => { const id = idOf(ev); if (id) highlight(id, true); });
  g.addEventListener("mouseout", (ev) => {
    const id = idOf(ev);
    const inside = ev.relatedTarget && S.nodeEls.get(id)?.contains(ev.relatedTarget);
    if (id && !inside) highlight(id, false);
  });
  g.addEventListener("click", (ev) => {
    const id = idOf(ev);
    if (!id) return;
    const t0 = performance.now();
    if (ev.shiftKey) togglePin(id); else showNode(id);
    S.timings.click = performance.now() - t0;
  });
  svg.append(g);
}

function nodeShape(n, k) {
  if (k === "error") return el("polygon", { points: "0,-6 6,0 0,6 -6,0", class: "shape" });
  if (k === "feature") return el("circle", { r: 5.5, class: "shape" });
  const text = k === "logit" ? logitText(n) : tokenText(n);
  const w = Math.max(24, Math.min(8 + text.length * 6.7, MAX_BOX_W));
  const grp = el("g", { class: "shape" });
  grp.append(el("rect", { x: -w / 2, y: -9, width: w, height: 18, rx: 4 }));
  grp.append(el("text", { y: 4, "text-anchor": "middle" }, text.slice(0, 18)));
  return grp;
}

function logitText(n) {
  const m = /^Output "([\s\S]*)" \(p=([0-9.]+)\)$/.exec(n.clerp || "");
  const text = m ? `${m[1]} ${(+m[2]).toFixed(2)}` : n.clerp || n.node_id;
  return text.replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r"); // one line
}

function supernodeOfMap() {
  const m = new Map();
  S.supernodes.forEach((g, i) => g.slice(1).forEach((id) =>
    m.set(id, { label: g[0], colour: SN_COLOURS[i % SN_COLOURS.length] })));
  return m;
}

function drawSupernodeLabels(svg) {
  const g = el("g", { class: "sn-labels" });
  S.supernodes.forEach((grp, i) => {
    const pts = grp.slice(1).map((id) => S.pos.get(id)).filter(Boolean);
    if (!pts.length) return;
    const x = Math.min(...pts.map((p) => p.x)), y = Math.min(...pts.map((p) => p.y));
    g.append(el("text", { x, y: y - 14, class: "sn-label", fill: SN_COLOURS[i % SN_COLOURS.length] },
      grp[0]));
  });
  svg.append(g);
}

// Hover: dim the drawn links (one class on the <svg>) and draw the node's own links, all of
// them up to MAX_HOVER_EDGES per direction, from the precomputed adjacency.
function highlight(id, on) {
  const t0 = performance.now();
  const svg = $("graph"), layer = svg.querySelector(".hl-edges");
  svg.classList.toggle("hovering", on);
  if (layer) layer.replaceChildren();
  const ng = S.nodeEls.get(id);
  if (ng) ng.classList.toggle("hovered", on);
  if (on && layer) {
    const lines = [];
    for (const [list, dir] of [[S.incoming.get(id), "hl-in"], [S.outgoing.get(id), "hl-out"]]) {
      let count = 0;
      for (const l of list || []) {
        const a = S.pos.get(l.source), b = S.pos.get(l.target);
        if (!a || !b) continue;
        if (++count > MAX_HOVER_EDGES) break;
        lines.push(el("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y,
          class: `edge ${l.weight >= 0 ? "pos" : "neg"} ${dir}`, "stroke-width": widthOf(l).toFixed(2) }));
      }
    }
    layer.append(...lines);
  }
  S.timings.hover = performance.now() - t0;
}

// ---- side panel: one node -------------------------------------------------------------
function showNode(id) {
  S.clicked = id;
  for (const [nid, ng] of S.nodeEls) ng.classList.toggle("clicked", nid === id);
  const panel = $("node-panel");
  panel.replaceChildren(el("h2", {}, "Node"));
  const n = S.byId.get(id);
  if (!n) { panel.append(el("p", { class: "hint" }, "Click a node for details.")); return; }
  const k = kindOf(n);
  panel.append(el("div", { class: "node-title" }, labelOf(n)));
  const facts = el("div", { class: "facts" },
    `${k} · id ${n.node_id} · layer ${n.layer} · pos ${n.ctx_idx}` +
    (n.activation != null ? ` · act ${fmt(n.activation)}` : "") +
    (n.influence != null ? ` · influence ${fmt(n.influence)}` : ""));
  panel.append(facts);
  const pin = el("button", { id: "pin-button" }, S.pinned.includes(id) ? "Unpin" : "Pin");
  pin.addEventListener("click", () => togglePin(id));
  panel.append(pin);
  if (k === "feature") panel.append(labelEditor(n));
  panel.append(edgeList("Strongest inputs", S.incoming.get(id), "source"));
  panel.append(edgeList("Strongest outputs", S.outgoing.get(id), "target"));
  if (k === "feature") panel.append(featureCard(n));
}

function labelEditor(n) {
  const row = el("div", { class: "row" });
  const input = el("input", { id: "label-input", value: labelOf(n), placeholder: "feature label" });
  const btn = el("button", { id: "label-set" }, "Set label");
  btn.addEventListener("click", () => {
    S.labels[n.node_id] = input.value; S.dirty = true;
    render(); renderPinned(); showNode(n.node_id); status("label changed (unsaved)");
  });
  row.append(input, btn);
  return row;
}

function edgeList(title, links, end) {
  const box = el("div", { class: "edge-list" });
  box.append(el("h3", {}, title));
  const top = (links || []).slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
  if (!top.length) box.append(el("p", { class: "hint" }, "none"));
  const ul = el("ul");
  for (const l of top) {
    const other = S.byId.get(l[end]);
    const li = el("li", { class: l.weight >= 0 ? "pos" : "neg" });
    li.append(el("span", { class: "w" }, fmt(l.weight)), el("span", {}, ` ${labelOf(other)}`));
    const heads = headsButton(l);
    if (heads) li.append(heads);
    li.addEventListener("click", () => showNode(other.node_id));
    ul.append(li);
  }
  box.append(ul);
  return box;
}

// ---- attention: the heads that carry an edge and why they attended -------------------
// From the graph JSON's optional "heads" block (`wiremap attribute --heads`): per link its
// heads by share of the edge, and for top heads the QK pairs behind their attention score.
function indexHeads(graph) {
  S.heads = new Map();
  const edges = graph.heads && Array.isArray(graph.heads.edges) ? graph.heads.edges : [];
  for (const e of edges) S.heads.set(`${e.source}>${e.target}`, e);
}

function headsButton(l) {
  const e = S.heads.get(`${l.source}>${l.target}`);
  if (!e) return null;
  const b = el("button", { class: "small heads-button", title: "attention heads of this edge" },
    "heads");
  b.addEventListener("click", (ev) => { ev.stopPropagation(); showEdgeHeads(e); });
  return b;
}

function nodeText(id) {
  const n = S.byId.get(id);
  if (n) return labelOf(n);
  const names = (S.graph.heads && S.graph.heads.names) || {};
  return names[id] || id;
}

function showEdgeHeads(e) {
  let box = $("edge-panel");
  if (!box) { box = el("div", { id: "edge-panel", class: "card" }); $("node-panel").append(box); }
  box.replaceChildren(el("h3", {}, `Heads of ${nodeText(e.source)} → ${nodeText(e.target)}`));
  box.append(el("div", { class: "facts" },
    `edge ${fmt(e.weight)} = heads + residual ${fmt(e.residual)}; click a head for its QK pairs`));
  const ul = el("ul", { class: "head-list" });
  for (const h of e.heads) {
    const li = el("li", { class: h.share >= 0 ? "pos" : "neg" });
    li.append(el("span", { class: "w" }, fmt(h.share)), el("span", {}, ` L${h.layer} H${h.head}`));
    if (h.qk) {
      li.classList.add("has-qk");
      li.addEventListener("click", () => showQK(h));
    }
    ul.append(li);
  }
  box.append(ul, el("div", { id: "qk-box" }));
  box.scrollIntoView({ block: "nearest" });
}

function showQK(h) {
  const q = S.graph.heads.qk[h.qk], box = $("qk-box");
  const toks = S.graph.metadata.prompt_tokens || [];
  box.replaceChildren(el("h3", {}, `Why L${h.layer} H${h.head} attended`));
  if (!q) { box.append(el("p", { class: "hint" }, "no QK pairs stored")); return; }
  const where = `query '${toks[q.query_pos] ?? q.query_pos}' → key '${toks[q.key_pos] ?? q.key_pos}'`;
  if (q.refused) { box.append(el("p", { class: "hint" }, `${where}: ${q.refused}`)); return; }
  const capped = q.capped_score !== undefined ? ` (soft-capped ${fmt(q.capped_score)})` : "";
  box.append(el("div", { class: "facts" }, `${where}: score ${fmt(q.score)}${capped}`));
  const table = el("table", { class: "qk-table" });
  table.append(el("tr", {}, ""));
  table.lastChild.append(el("th", {}, "term"), el("th", {}, "query side"), el("th", {}, "key side"));
  for (const [qid, kid, v] of q.pairs) {
    const tr = el("tr", { class: v >= 0 ? "pos" : "neg" });
    tr.append(el("td", { class: "w" }, fmt(v)), el("td", {}, nodeText(qid)), el("td", {}, nodeText(kid)));
    table.append(tr);
  }
  box.append(table);
}

function featureCard(n) {
  const box = el("div", { class: "card", id: "feature-card" });
  box.append(el("h3", {}, "Feature card"));
  if (S.embedded) {
    box.append(el("p", { class: "hint" }, "Feature cards are shown by `wiremap serve`."));
    return box;
  }
  box.append(el("p", { class: "hint" }, "loading…"));
  api(`/api/feature?name=${encodeURIComponent(S.name)}&node=${encodeURIComponent(n.node_id)}`)
    .then((card) => { if (S.clicked === n.node_id) drawCard(box, card); })
    .catch((err) => { box.lastChild.textContent = err.message; });
  return box;
}

function drawCard(box, card) {
  box.replaceChildren(el("h3", {}, "Feature card"));
  box.append(el("div", { class: "facts" },
    `max ${fmt(card.maxActApprox)} · active on ${(100 * card.frac_nonzero).toPrecision(3)}% of tokens`));
  box.append(histogram(card.freq_hist_data_bar_values || [], card.freq_hist_data_bar_heights || []));
  box.append(tokenRow("promotes", card.pos_str, card.pos_values, "pos"));
  box.append(tokenRow("suppresses", card.neg_str, card.neg_values, "neg"));
  for (const act of (card.activations || []).slice(0, 12)) box.append(context(act));
}

function histogram(values, heights) {
  const w = 240, h = 40, svg = el("svg", { width: w, height: h, class: "hist" });
  const top = Math.max(1, ...heights);
  heights.forEach((c, i) => {
    const bh = (h - 2) * (c / top), bw = w / heights.length;
    const r = el("rect", { x: i * bw, y: h - bh, width: Math.max(1, bw - 1), height: bh });
    r.append(el("title", {}, `${fmt(values[i])}: ${c}`));
    svg.append(r);
  });
  return svg;
}

function tokenRow(title, strs, vals, cls) {
  const row = el("div", { class: `tokens ${cls}` });
  row.append(el("span", { class: "hint" }, `${title}: `));
  (strs || []).forEach((s, i) => row.append(el("code", { title: fmt(vals[i]) }, s)));
  return row;
}

function context(act) {
  const div = el("div", { class: "context" });
  const max = Math.max(1e-12, act.maxValue || Math.max(...act.values));
  act.tokens.forEach((t, i) => {
    const v = act.values[i] || 0;
    const span = el("span", { title: fmt(v) }, t);
    if (v > 0) span.style.background = `rgba(255,140,0,${Math.min(1, v / max).toFixed(2)})`;
    if (i === act.maxValueTokenIndex) span.className = "max";
    div.append(span);
  });
  if (act.binContains !== undefined) div.classList.add("quantile");
  return div;
}

// ---- pins, supernodes, scores ----------------------------------------------------------
function togglePin(id) {
  const i = S.pinned.indexOf(id);
  if (i >= 0) {
    S.pinned.splice(i, 1); S.ticked.delete(id);
    S.supernodes = S.supernodes.map((g) => g.filter((m, j) => j === 0 || m !== id))
      .filter((g) => g.length > 1);
  } else S.pinned.push(id);
  S.dirty = true;
  render(); renderPinned(); if (S.clicked) showNode(S.clicked); updateScores();
}

function renderPinned() {
  const ul = $("pinned-list");
  ul.replaceChildren();
  for (const id of S.pinned) {
    const n = S.byId.get(id);
    const li = el("li", { "data-id": id });
    const box = el("input", { type: "checkbox", class: "tick", "data-id": id });
    box.checked = S.ticked.has(id);
    box.addEventListener("change", () => (box.checked ? S.ticked.add(id) : S.ticked.delete(id)));
    const name = el("span", { class: "link" }, ` ${labelOf(n)} `);
    name.addEventListener("click", () => showNode(id));
    const x = el("button", { class: "small" }, "×");
    x.addEventListener("click", () => togglePin(id));
    li.append(box, name, x);
    ul.append(li);
  }
  if (!S.pinned.length) ul.append(el("li", { class: "hint" }, "nothing pinned yet"));
  renderSupernodes();
}

function renderSupernodes() {
  const ul = $("supernode-list");
  ul.replaceChildren();
  S.supernodes.forEach((g, i) => {
    const li = el("li", { class: "supernode", "data-label": g[0] });
    const box = el("input", { type: "checkbox", class: "sn-tick", "data-index": i });
    const name = el("span", { style: `color:${SN_COLOURS[i % SN_COLOURS.length]}` }, ` ${g[0]} `);
    const members = el("span", { class: "hint" }, `(${g.length - 1} nodes) `);
    const x = el("button", { class: "small" }, "ungroup");
    x.addEventListener("click", () => {
      S.supernodes.splice(i, 1); S.dirty = true; render(); renderPinned();
    });
    li.append(box, name, members, x);
    ul.append(li);
  });
}

function groupTicked() {
  const ids = S.pinned.filter((id) => S.ticked.has(id));
  if (ids.length < 1) { status("tick pinned nodes to group them", true); return; }
  const label = $("supernode-label").value.trim() || `supernode ${S.supernodes.length + 1}`;
  S.supernodes = S.supernodes.map((g) => g.filter((m, j) => j === 0 || !ids.includes(m)))
    .filter((g) => g.length > 1);
  S.supernodes.push([label, ...ids]);
  S.ticked.clear(); $("supernode-label").value = ""; S.dirty = true;
  render(); renderPinned(); status(`grouped ${ids.length} nodes as "${label}" (unsaved)`);
}

let scoreTimer = null;
function updateScores() {
  const box = $("scores");
  if (S.embedded) {
    const sc = S.graph.metadata.scores || {};
    box.replaceChildren(...Object.entries(sc).filter(([, v]) => v && v.replacement !== undefined)
      .map(([k, v]) => el("div", {}, `${k} graph: replacement ${fmt(v.replacement)}, ` +
        `completeness ${fmt(v.completeness)}`)));
    return;
  }
  clearTimeout(scoreTimer);
  scoreTimer = setTimeout(() => {
    const name = S.name;
    api("/api/scores", { name, pinnedIds: S.pinned }).then((r) => {
      if (name !== S.name) return;
      box.replaceChildren(el("div", { id: "pinned-scores" },
        `pinned subgraph: replacement ${fmt(r.pinned.replacement)}, ` +
        `completeness ${fmt(r.pinned.completeness)} (${r.pinned.n_features} features)`));
      box.append(el("div", { class: "hint" }, "Scores use the saved (pruned) links; unpinned " +
        "features count as error at their layer and position."));
    }).catch((err) => { box.textContent = err.message; });
  }, 150);
}

// ---- steering ---------------------------------------------------------------------------
function steerTargets() {
  const ids = new Set(S.pinned.filter((id) => S.ticked.has(id)));
  document.querySelectorAll(".sn-tick").forEach((b) => {
    if (b.checked) S.supernodes[+b.dataset.index].slice(1).forEach((id) => ids.add(id));
  });
  return [...ids].filter((id) => kindOf(S.byId.get(id)) === "feature");
}

async function steer(ablate) {
  const nodes = steerTargets(), out = $("steer-result");
  if (!nodes.length) { out.textContent = "tick pinned features or supernodes first"; return; }
  out.textContent = "running the model…";
  try {
    const r = await api("/api/steer", {
      name: S.name, nodes, ablate, scale: parseFloat($("steer-scale").value),
      all_positions: $("steer-all").checked, max_new_tokens: parseInt($("steer-n").value, 10),
    });
    out.replaceChildren(tokenTable(r.baseline, r.steered),
      el("div", { class: "gen" }, `before: ${r.baseline_text}`),
      el("div", { class: "gen steered" }, `after: ${r.steered_text}`));
  } catch (err) { out.textContent = err.message; }
}

function tokenTable(before, after) {
  const t = el("table", { class: "steer-table" });
  const head = el("tr");
  head.append(el("th", {}, "before"), el("th", {}, "after"));
  t.append(head);
  for (let i = 0; i < Math.max(before.length, after.length); i++) {
    const tr = el("tr");
    for (const x of [before[i], after[i]]) {
      tr.append(el("td", {}, x ? `${JSON.stringify(x.token)} ${(100 * x.prob).toFixed(1)}%` : ""));
    }
    t.append(tr);
  }
  return t;
}

// ---- saving and loading -----------------------------------------------------------------
function edits() {
  return { pinnedIds: S.pinned, supernodes: S.supernodes, clickedId: S.clicked || "" };
}

async function save() {
  if (S.embedded) return downloadGraph();
  try {
    await api("/api/save", { name: S.name, qParams: edits(), labels: S.labels });
    S.dirty = false;
    status(`saved ${S.name}`);
  } catch (err) { status(`not saved: ${err.message}`, true); }
}

function downloadGraph() {
  const g = JSON.parse(JSON.stringify(S.graph));
  Object.assign(g.qParams = g.qParams || {}, edits());
  for (const n of g.nodes) if (S.labels[n.node_id] !== undefined) n.clerp = S.labels[n.node_id];
  const a = el("a", { download: `${g.metadata.slug || "graph"}.json` });
  a.href = URL.createObjectURL(new Blob([JSON.stringify(g)], { type: "application/json" }));
  a.click();
  status("downloaded the edited graph JSON");
}

async function loadGraph(name) {
  status(`loading ${name}…`);
  try {
    setGraph(name, await api(`/api/graph?name=${encodeURIComponent(name)}`));
    location.hash = encodeURIComponent(name);
    status(`${name}: ${S.graph.nodes.length} nodes, ${S.graph.links.length} links`);
  } catch (err) {
    $("graph").replaceChildren();
    status(`${name}: ${err.message}`, true);
  }
}

async function init() {
  let pending = false;
  $("prune").addEventListener("input", (e) => {
    S.threshold = parseFloat(e.target.value);
    $("prune-value").textContent = S.threshold.toFixed(2);
    if (!S.graph || pending) return;
    pending = true; // dragging fires faster than a big graph redraws: one render per frame
    requestAnimationFrame(() => { pending = false; render(); });
  });
  $("show-errors").addEventListener("change", (e) => { S.showErrors = e.target.checked; render(); });
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => S.graph && render(), 100);
  });
  $("save").addEventListener("click", save);
  $("group").addEventListener("click", groupTicked);
  $("steer").addEventListener("click", () => steer(false));
  $("ablate").addEventListener("click", () => steer(true));
  const embedded = $("wiremap-graph");
  if (embedded) {
    S.embedded = true;
    document.body.classList.add("embedded");
    $("save").textContent = "Download JSON";
    const g = JSON.parse(embedded.textContent);
    return setGraph(g.metadata.slug || "graph", g);
  }
  await listGraphs();
}

async function listGraphs() {
  const sel = $("graph-select");
  let list;
  try { list = await api("/api/list"); } catch (err) { return status(err.message, true); }
  sel.replaceChildren(...list.graphs.map((g) => el("option", { value: g.name }, g.name)));
  sel.onchange = () => loadGraph(sel.value);
  if (!list.graphs.length) return status(`no graph JSON files in ${list.folder}`, true);
  const wanted = decodeURIComponent(location.hash.slice(1));
  const name = list.graphs.some((g) => g.name === wanted) ? wanted : list.graphs[0].name;
  sel.value = name;
  await loadGraph(name);
}

function fmt(x) {
  if (x === null || x === undefined || isNaN(x)) return "–";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : (+x).toPrecision(3);
}

window.wiremapViewer = { state: S, loadGraph, save, togglePin, showNode, groupTicked, highlight };
document.addEventListener("DOMContentLoaded", init);
