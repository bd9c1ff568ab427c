// The attribution graph page. Data: nodes (id, kind, layer, pos, label, cumulative influence) and links
// [source, target, weight, cumulative edge share]. Strings go into the document with textContent only.
(function () {
  var data = pageData();
  var app = document.getElementById('app');
  var nodes = data.nodes, links = data.links;
  var state = { nodeT: data.nodeThreshold, edgeT: data.edgeThreshold, clicked: null, selected: new Set(), groups: [], hoverPos: null };
  var storeKey = 'transcoders-graph-supernodes:' + data.title + ':' + data.prompt;

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) { if (k === 'class') e.className = attrs[k]; else e.setAttribute(k, attrs[k]); }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, d) { return (v === null || v === undefined || isNaN(v)) ? '\u2013' : Number(v).toPrecision(d || 3); }
  function show(s) { return String(s).replace(/\n/g, '\u21b5'); }

  // ---- controls ----
  var controls = el('div', { class: 'controls' });
  app.appendChild(controls);
  function slider(id, label, min, max, value, onInput) {
    controls.appendChild(el('label', { for: id }, label));
    var s = el('input', { id: id, type: 'range', min: String(min), max: String(max), step: '0.005', value: String(value) });
    var v = el('span', { class: 'small' }, Number(value).toFixed(3));
    s.addEventListener('input', function () { v.textContent = Number(s.value).toFixed(3); onInput(+s.value); });
    controls.appendChild(s); controls.appendChild(v);
    return s;
  }
  slider('node-threshold', 'Node threshold', 0.3, data.maxNodeThreshold, data.nodeThreshold, function (v) { state.nodeT = v; draw(); });
  slider('edge-threshold', 'Edge threshold', 0.3, data.maxEdgeThreshold, data.edgeThreshold, function (v) { state.edgeT = v; draw(); });
  var counts = el('span', { class: 'muted small', id: 'counts' });
  controls.appendChild(counts);
  if (data.scores) controls.appendChild(el('span', { class: 'small' }, 'replacement score ' + fmt(data.scores.replacement) + ' \u00b7 completeness ' + fmt(data.scores.completeness)));

  var gcontrols = el('div', { class: 'controls' });
  app.appendChild(gcontrols);
  gcontrols.appendChild(el('span', { class: 'small muted' }, 'Supernodes: shift-click nodes to select, then'));
  var gname = el('input', { id: 'group-name', type: 'text', placeholder: 'supernode name', size: '18' });
  var gbtn = el('button', { type: 'button', id: 'group-button' }, 'group selected');
  var clearSel = el('button', { type: 'button' }, 'clear selection');
  var saveBtn = el('button', { type: 'button', id: 'save-groups' }, 'save grouping (JSON)');
  var loadLbl = el('label', { class: 'small' }, 'load grouping: ');
  var loadInput = el('input', { type: 'file', accept: '.json,application/json' });
  loadLbl.appendChild(loadInput);
  [gname, gbtn, clearSel, saveBtn, loadLbl].forEach(function (x) { gcontrols.appendChild(x); });

  var legend = el('div', { class: 'legend small muted' });
  [['feature', '#f6ad55'], ['error (unexplained MLP output)', '#a0aec0'], ['token embedding', '#68d391'], ['logit', '#63b3ed']].forEach(function (p) {
    var s = el('span'); var sw = el('span', { class: 'sw' }); sw.style.background = p[1]; s.appendChild(sw); s.appendChild(document.createTextNode(p[0])); legend.appendChild(s);
  });
  var es = el('span'); es.appendChild(document.createTextNode('edges: ')); var ep = el('span', null, 'excitatory'); ep.style.color = '#2b6cb0';
  var en = el('span', null, 'inhibitory'); en.style.color = '#c53030'; es.appendChild(ep); es.appendChild(document.createTextNode(' / ')); es.appendChild(en);
  legend.appendChild(es);
  app.appendChild(legend);

  var layout = el('div', { class: 'layout' });
  var box = el('div', { class: 'graph-box' });
  var side = el('div', { class: 'side panel', id: 'side' });
  layout.appendChild(box); layout.appendChild(side);
  app.appendChild(layout);

  var nPos = data.tokens.length, nRows = data.nLayers + 2;
  var m = { l: 56, r: 16, t: 20, b: 70 };
  var avail = Math.max(600, (window.innerWidth || 1400) - 440) - m.l - m.r;
  var rowH = 76;
  var W = m.l + m.r + Math.max(avail, 26 * nPos), H = m.t + m.b + rowH * (nRows - 1);
  var svg = d3.select(box).append('svg').attr('id', 'graph').attr('width', W).attr('height', H);
  function rowOf(n) { return n.kind === 'token' ? 0 : n.kind === 'logit' ? nRows - 1 : n.layer + 1; }
  function yOf(row) { return m.t + (nRows - 1 - row) * rowH; }
  var gRows = svg.append('g'), gGroups = svg.append('g'), gEdges = svg.append('g'), gNodes = svg.append('g'), gTokens = svg.append('g');
  for (var r = 0; r < nRows; r++) {
    gRows.append('line').attr('x1', m.l).attr('x2', W - m.r).attr('y1', yOf(r)).attr('y2', yOf(r)).attr('stroke', '#edf2f7');
    gRows.append('text').attr('class', 'rowlabel').attr('x', 4).attr('y', yOf(r) + 4).text(r === 0 ? 'emb' : r === nRows - 1 ? 'logits' : 'L' + (r - 1));
  }
  // columns are as wide as the most crowded cell of their position needs (circuit-tracer's layout idea)
  var colX = [], colWs = [];
  function layoutColumns(shown) {
    var need = data.tokens.map(function () { return 1; }), cells = {};
    nodes.forEach(function (n, i) { if (!shown[i]) return; var k = rowOf(n) + ':' + n.pos; cells[k] = (cells[k] || 0) + 1; need[n.pos] = Math.max(need[n.pos], cells[k]); });
    var weights = need.map(function (c) { return 2 + Math.min(c, 24); });
    var total = d3.sum(weights), width = Math.max(avail, 26 * nPos), x = m.l;
    colWs = weights.map(function (w) { return width * w / total; });
    colX = colWs.map(function (w) { var c = x + w / 2; x += w; return c; });
  }
  data.tokens.forEach(function (t, p) {
    var tx = gTokens.append('text').attr('class', 'toklabel').attr('data-pos', p).attr('text-anchor', 'end').text(show(t));
    tx.append('title').text('position ' + p + ': ' + show(t));
    tx.on('mouseenter', function () { state.hoverPos = p; highlight(); }).on('mouseleave', function () { state.hoverPos = null; highlight(); });
  });
  function placeTokens() {
    gTokens.selectAll('.toklabel').attr('transform', function () { var p = +this.getAttribute('data-pos'); return 'translate(' + (colX[p] + 4) + ',' + (H - m.b + 16) + ') rotate(-35)'; });
  }

  function visible() {
    var keepNode = nodes.map(function (n) { return n.kind === 'token' || n.kind === 'logit' || n.cum <= state.nodeT + 1e-12; });
    var vis = links.filter(function (l) { return l[3] <= state.edgeT + 1e-12 && keepNode[l[0]] && keepNode[l[1]]; });
    var has = new Set();
    vis.forEach(function (l) { has.add(l[0]); has.add(l[1]); });
    var shown = nodes.map(function (n, i) { return keepNode[i] && (n.kind === 'token' || n.kind === 'logit' || has.has(i)); });
    vis = vis.filter(function (l) { return shown[l[0]] && shown[l[1]]; });
    return { shown: shown, links: vis };
  }

  var pos = [];
  function place(shown) {
    layoutColumns(shown);
    placeTokens();
    var cells = {};
    nodes.forEach(function (n, i) { if (!shown[i]) return; var k = rowOf(n) + ':' + n.pos; (cells[k] = cells[k] || []).push(i); });
    pos = nodes.map(function () { return null; });
    Object.keys(cells).forEach(function (k) {
      var ids = cells[k].sort(function (a, b) { return nodes[a].cum - nodes[b].cum; });
      var n = ids.length, p0 = nodes[ids[0]].pos, dx = Math.min(13, (colWs[p0] - 8) / Math.max(1, n));
      ids.forEach(function (i, j) {
        var nd = nodes[i];
        pos[i] = { x: colX[nd.pos] + (j - (n - 1) / 2) * dx, y: yOf(rowOf(nd)) };
      });
    });
  }

  function draw() {
    var v = visible();
    place(v.shown);
    var maxW = d3.max(v.links, function (l) { return Math.abs(l[2]); }) || 1;
    var es = gEdges.selectAll('line.edge').data(v.links.slice().sort(function (a, b) { return Math.abs(a[2]) - Math.abs(b[2]); }), function (l) { return l[0] + '>' + l[1]; });
    es.exit().remove();
    es.enter().append('line').attr('class', 'edge').merge(es)
      .attr('x1', function (l) { return pos[l[0]].x; }).attr('y1', function (l) { return pos[l[0]].y; })
      .attr('x2', function (l) { return pos[l[1]].x; }).attr('y2', function (l) { return pos[l[1]].y; })
      .attr('stroke', function (l) { return l[2] >= 0 ? '#2b6cb0' : '#c53030'; })
      .attr('stroke-width', function (l) { return 0.4 + 3.6 * Math.abs(l[2]) / maxW; })
      .attr('stroke-opacity', function (l) { return 0.12 + 0.7 * Math.abs(l[2]) / maxW; });
    var shownIdx = [];
    v.shown.forEach(function (s, i) { if (s) shownIdx.push(i); });
    var ns = gNodes.selectAll('.node').data(shownIdx, function (i) { return nodes[i].id; });
    ns.exit().remove();
    var enter = ns.enter().append('path').attr('class', function (i) { return 'node ' + nodes[i].kind; });
    enter.append('title');
    enter.on('click', function (ev, i) {
      if (ev.shiftKey) { if (state.selected.has(nodes[i].id)) state.selected.delete(nodes[i].id); else state.selected.add(nodes[i].id); }
      else state.clicked = i;
      highlight(); panel();
    });
    enter.merge(ns)
      .attr('d', function (i) {
        var k = nodes[i].kind;
        var sym = k === 'feature' ? d3.symbolCircle : k === 'error' ? d3.symbolSquare : k === 'logit' ? d3.symbolDiamond : d3.symbolSquare;
        return d3.symbol().type(sym).size(k === 'token' || k === 'logit' ? 110 : 70)();
      })
      .attr('transform', function (i) { return 'translate(' + pos[i].x + ',' + pos[i].y + ')'; })
      .select('title').text(function (i) {
        var n = nodes[i];
        return show(n.label) + (n.act !== undefined ? '  activation ' + fmt(n.act) : '') + (n.prob !== undefined ? '  p=' + fmt(n.prob) : '') + '  influence ' + fmt(n.infl);
      });
    counts.textContent = shownIdx.length + ' nodes, ' + v.links.length + ' edges shown';
    state.vis = v;
    drawGroups();
    highlight();
    markDrawn('graph');
  }

  function highlight() {
    var v = state.vis; if (!v) return;
    var focus = null;
    if (state.clicked !== null && v.shown[state.clicked]) {
      focus = new Set([state.clicked]);
      v.links.forEach(function (l) { if (l[0] === state.clicked || l[1] === state.clicked) { focus.add(l[0]); focus.add(l[1]); } });
    }
    gNodes.selectAll('.node')
      .classed('clicked', function (i) { return i === state.clicked; })
      .classed('sel', function (i) { return state.selected.has(nodes[i].id); })
      .classed('hl', function (i) { return state.hoverPos !== null && nodes[i].pos === state.hoverPos; })
      .classed('dim', function (i) { return focus !== null && !focus.has(i); });
    gEdges.selectAll('line.edge').classed('dim', function (l) { return focus !== null && l[0] !== state.clicked && l[1] !== state.clicked; });
    gTokens.selectAll('.toklabel').classed('hl', function () { return state.hoverPos !== null && +this.getAttribute('data-pos') === state.hoverPos; });
  }

  function nodeLink(i) {
    var a = el('a', { class: 'nodelink' }, show(nodes[i].label));
    a.addEventListener('click', function () { state.clicked = i; highlight(); panel(); });
    return a;
  }
  function edgeTable(title, rows, other) {
    var d = el('div'); d.appendChild(el('h3', null, title));
    if (!rows.length) { d.appendChild(el('div', { class: 'muted small' }, 'none shown')); return d; }
    var t = el('table');
    rows.slice(0, 12).forEach(function (l) {
      var tr = el('tr'); var td = el('td'); td.appendChild(nodeLink(l[other])); tr.appendChild(td);
      tr.appendChild(el('td', { class: 'num w ' + (l[2] >= 0 ? 'pos' : 'neg') }, fmt(l[2])));
      t.appendChild(tr);
    });
    d.appendChild(t); return d;
  }
  function panel() {
    side.innerHTML = '';
    if (state.clicked === null) {
      side.appendChild(el('div', { class: 'muted' }, 'Click a node to see its strongest inputs and outputs; hover a token to see the nodes at its position.'));
    } else {
      var n = nodes[state.clicked];
      side.appendChild(el('h2', { id: 'clicked-label' }, show(n.label)));
      var info = n.kind + ' \u00b7 ' + (n.kind === 'token' ? 'position ' + n.pos : n.kind === 'logit' ? 'p = ' + fmt(n.prob) : 'layer ' + n.layer + ', position ' + n.pos);
      if (n.act !== undefined) info += ' \u00b7 activation ' + fmt(n.act);
      info += ' \u00b7 influence ' + fmt(n.infl) + ' (cumulative ' + fmt(n.cum) + ')';
      side.appendChild(el('div', { class: 'small' }, info));
      side.appendChild(el('div', { class: 'small muted' }, 'id ' + n.id));
      if (n.page) { var a = el('a', { href: n.page, target: '_blank' }, 'open its feature page'); side.appendChild(a); }
      var v = state.vis;
      var ins = v.links.filter(function (l) { return l[1] === state.clicked; }).sort(function (a, b) { return Math.abs(b[2]) - Math.abs(a[2]); });
      var outs = v.links.filter(function (l) { return l[0] === state.clicked; }).sort(function (a, b) { return Math.abs(b[2]) - Math.abs(a[2]); });
      side.appendChild(edgeTable('Strongest inputs', ins, 0));
      side.appendChild(edgeTable('Strongest outputs', outs, 1));
    }
    side.appendChild(el('h3', null, 'Supernodes (' + state.groups.length + ')'));
    state.groups.forEach(function (g, gi) {
      var row = el('div', { class: 'small' });
      row.appendChild(document.createTextNode(g.name + ': ' + g.ids.length + ' nodes '));
      var b = el('button', { type: 'button' }, 'ungroup');
      b.addEventListener('click', function () { state.groups.splice(gi, 1); persist(); drawGroups(); panel(); });
      row.appendChild(b); side.appendChild(row);
    });
    if (state.selected.size) side.appendChild(el('div', { class: 'small muted' }, state.selected.size + ' node(s) selected'));
  }

  function drawGroups() {
    gGroups.selectAll('*').remove();
    var byId = {}; nodes.forEach(function (n, i) { byId[n.id] = i; });
    state.groups.forEach(function (g) {
      var pts = g.ids.map(function (id) { return byId[id]; }).filter(function (i) { return i !== undefined && pos[i]; }).map(function (i) { return pos[i]; });
      if (!pts.length) return;
      var x0 = d3.min(pts, function (p) { return p.x; }) - 10, x1 = d3.max(pts, function (p) { return p.x; }) + 10;
      var y0 = d3.min(pts, function (p) { return p.y; }) - 10, y1 = d3.max(pts, function (p) { return p.y; }) + 10;
      gGroups.append('rect').attr('class', 'group-box').attr('x', x0).attr('y', y0).attr('width', x1 - x0).attr('height', y1 - y0).attr('rx', 6);
      gGroups.append('text').attr('class', 'group-label').attr('x', x0 + 2).attr('y', y0 - 3).text(g.name);
    });
  }

  function persist() { try { localStorage.setItem(storeKey, JSON.stringify(state.groups)); } catch (e) { /* storage may be off for file:// */ } }
  function restore() { try { var s = localStorage.getItem(storeKey); if (s) state.groups = JSON.parse(s); } catch (e) { state.groups = []; } }
  function asSupernodes() { return state.groups.map(function (g) { return [g.name].concat(g.ids); }); }
  function fromSupernodes(list) {
    return (list || []).filter(function (x) { return Array.isArray(x) && x.length > 1; })
      .map(function (x) { return { name: String(x[0]), ids: x.slice(1).map(String) }; });
  }
  gbtn.addEventListener('click', function () {
    if (!state.selected.size) return;
    var name = gname.value.trim() || ('group ' + (state.groups.length + 1));
    state.groups.push({ name: name, ids: Array.from(state.selected) });
    state.selected.clear(); gname.value = '';
    persist(); drawGroups(); highlight(); panel();
  });
  clearSel.addEventListener('click', function () { state.selected.clear(); highlight(); panel(); });
  saveBtn.addEventListener('click', function () {
    var json = JSON.stringify({ supernodes: asSupernodes(), qParams: { supernodes: asSupernodes() } }, null, 2);
    var a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([json], { type: 'application/json' }));
    a.download = 'supernodes.json';
    document.body.appendChild(a); a.click(); a.remove();
  });
  loadInput.addEventListener('change', function () {
    var f = loadInput.files[0]; if (!f) return;
    var rd = new FileReader();
    rd.onload = function () {
      try {
        var j = JSON.parse(rd.result);
        var list = Array.isArray(j) ? j : (j.supernodes || (j.qParams && j.qParams.supernodes) || []);
        state.groups = fromSupernodes(list); persist(); drawGroups(); panel();
      } catch (e) { console.error('not a grouping file: ' + e); }
    };
    rd.readAsText(f);
  });

  restore();
  draw();
  panel();
})();
