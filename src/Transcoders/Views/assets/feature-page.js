// The feature page of one coder: pick a layer and a feature; see its top examples, quantile samples, activation
// histogram, logit effects, de-embeddings and where it fires on the user's own texts. Every string from the model or
// the user is put into the document with textContent (never as HTML).
(function () {
  var data = pageData();
  var app = document.getElementById('app');
  var vocab = data.vocab;
  var state = { layer: 0, feature: null, text: null, pos: null };

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) { if (k === 'class') e.className = attrs[k]; else e.setAttribute(k, attrs[k]); }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function tokText(id) {
    var s = vocab[String(id)];
    if (s === undefined) s = '<' + id + '>';
    return s.replace(/\n/g, '\u21b5');
  }
  function fmt(v, d) { return (v === null || v === undefined || isNaN(v)) ? '\u2013' : Number(v).toPrecision(d || 3); }
  function pct(v) { return (v === null || v === undefined) ? '\u2013' : (100 * v).toPrecision(3) + '%'; }
  function shade(a, max) {
    if (!(a > 0) || !(max > 0)) return 'transparent';
    var t = Math.min(1, a / max);
    return 'rgba(237, 137, 54,' + (0.12 + 0.78 * t).toFixed(3) + ')';
  }
  function layerData() { return data.layers[state.layer]; }
  function feat() { return layerData().features[state.feature]; }

  // ---- controls ----
  var controls = el('div', { class: 'controls' });
  app.appendChild(controls);
  var layerSel = el('select', { id: 'layer-picker' });
  data.layers.forEach(function (l, i) { layerSel.appendChild(el('option', { value: String(i) }, 'layer ' + l.layer)); });
  controls.appendChild(el('label', { for: 'layer-picker' }, 'Layer'));
  controls.appendChild(layerSel);
  controls.appendChild(el('label', { for: 'feature-input' }, 'Feature'));
  var featInput = el('input', { id: 'feature-input', type: 'number', min: '0', step: '1', style: 'width:6em' });
  controls.appendChild(featInput);
  var liveSel = el('select', { id: 'feature-picker' });
  controls.appendChild(liveSel);
  var prev = el('button', { type: 'button' }, '\u25c0 prev'); var next = el('button', { type: 'button' }, 'next \u25b6');
  controls.appendChild(prev); controls.appendChild(next);
  var view = el('div', { id: 'feature-view' });
  app.appendChild(view);

  function fillLive() {
    liveSel.innerHTML = '';
    var fs = layerData().features.slice().sort(function (a, b) { return b.n - a.n; });
    liveSel.appendChild(el('option', { value: '' }, 'live features by frequency (' + fs.filter(function (f) { return f.n > 0; }).length + ' of ' + fs.length + ')'));
    fs.forEach(function (f) { if (f.n > 0) liveSel.appendChild(el('option', { value: String(f.f) }, '#' + f.f + '  ' + pct(f.freq) + '  max ' + fmt(f.max))); });
    featInput.max = String(layerData().features.length - 1);
  }
  layerSel.addEventListener('change', function () { state.layer = +layerSel.value; fillLive(); select(firstLive()); });
  featInput.addEventListener('change', function () { select(+featInput.value); });
  liveSel.addEventListener('change', function () { if (liveSel.value !== '') select(+liveSel.value); });
  prev.addEventListener('click', function () { select(Math.max(0, state.feature - 1)); });
  next.addEventListener('click', function () { select(Math.min(layerData().features.length - 1, state.feature + 1)); });

  function firstLive() {
    var fs = layerData().features.slice().sort(function (a, b) { return b.n - a.n; });
    return fs.length ? fs[0].f : 0;
  }

  // ---- pieces ----
  function contextRow(ex, max) {
    var row = el('div', { class: 'ctx' });
    ex.t.forEach(function (id, i) {
      var s = el('span', { class: 'tok' + (i === ex.c ? ' max' : ''), title: 'activation ' + fmt(ex.a[i]) }, tokText(id));
      s.style.background = shade(ex.a[i], max);
      row.appendChild(s);
    });
    row.appendChild(el('span', { class: 'muted small' }, '   ' + fmt(ex.a[ex.c]) + '  (sequence ' + ex.s + ', token ' + ex.p + ')'));
    return row;
  }
  function scoreTable(title, rows) {
    var box = el('div');
    box.appendChild(el('h3', null, title));
    if (!rows || !rows.length) { box.appendChild(el('div', { class: 'muted' }, 'none')); return box; }
    var m = Math.max.apply(null, rows.map(function (r) { return Math.abs(r[1]); })) || 1;
    var t = el('table', { class: 'tbl' });
    rows.forEach(function (r) {
      var tr = el('tr');
      tr.appendChild(el('td', { class: 'tokcell' }, tokText(r[0])));
      tr.appendChild(el('td', { class: 'num' }, fmt(r[1])));
      var td = el('td'); var b = el('span', { class: 'bar ' + (r[1] >= 0 ? 'pos' : 'neg') });
      b.style.width = Math.round(80 * Math.abs(r[1]) / m) + 'px'; td.appendChild(b); tr.appendChild(td);
      t.appendChild(tr);
    });
    box.appendChild(t);
    return box;
  }
  function histogram(f) {
    var box = el('div');
    box.appendChild(el('h3', null, 'Activation histogram (log scale, all ' + f.n + ' firings)'));
    var edges = data.histEdges, counts = f.hist;
    var lo = 0, hi = counts.length - 1;
    while (lo < hi && counts[lo] === 0) lo++;
    while (hi > lo && counts[hi] === 0) hi--;
    var w = 460, h = 150, m = { l: 44, r: 8, t: 6, b: 30 };
    var svg = d3.select(box).append('svg').attr('width', w).attr('height', h).attr('class', 'hist');
    var x = d3.scaleLinear().domain([edges[lo], edges[hi + 1]]).range([m.l, w - m.r]);
    var ymax = d3.max(counts) || 1;
    var y = d3.scaleLinear().domain([0, ymax]).nice().range([h - m.b, m.t]);
    var bars = [];
    for (var i = lo; i <= hi; i++) bars.push({ a: edges[i], b: edges[i + 1], c: counts[i] });
    svg.selectAll('rect').data(bars).enter().append('rect')
      .attr('x', function (d) { return x(d.a) + 0.5; }).attr('width', function (d) { return Math.max(1, x(d.b) - x(d.a) - 1); })
      .attr('y', function (d) { return y(d.c); }).attr('height', function (d) { return y(0) - y(d.c); })
      .attr('fill', '#ed8936').append('title').text(function (d) { return Math.pow(10, d.a).toPrecision(2) + '\u2013' + Math.pow(10, d.b).toPrecision(2) + ': ' + d.c; });
    svg.append('g').attr('transform', 'translate(0,' + (h - m.b) + ')')
      .call(d3.axisBottom(x).ticks(6).tickFormat(function (v) { return Math.pow(10, v).toPrecision(2); }));
    svg.append('g').attr('transform', 'translate(' + m.l + ',0)').call(d3.axisLeft(y).ticks(4));
    svg.append('text').attr('x', w / 2).attr('y', h - 2).attr('text-anchor', 'middle').text('activation');
    return box;
  }

  function userTexts(f) {
    var box = el('div', { id: 'user-texts' });
    var texts = layerData().texts || [];
    box.appendChild(el('h2', null, 'Your texts'));
    if (!texts.length) { box.appendChild(el('div', { class: 'muted' }, 'no texts were given (dashboard --text "...")')); return box; }
    box.appendChild(el('div', { class: 'muted small' }, 'Shaded by this feature\u2019s activation; click a token to list every feature active there.'));
    var max = f.max;
    texts.forEach(function (t, ti) {
      var vals = t.act.map(function (a) { for (var k = 0; k < a.length; k++) if (a[k][0] === f.f) return a[k][1]; return 0; });
      var m2 = Math.max(max || 0, d3.max(vals) || 0);
      var row = el('div', { class: 'usertext' });
      t.t.forEach(function (id, p) {
        var s = el('span', { class: 'tok' + (state.text === ti && state.pos === p ? ' sel' : ''), title: 'activation ' + fmt(vals[p]) }, tokText(id));
        s.style.background = shade(vals[p], m2);
        s.addEventListener('click', function () { state.text = ti; state.pos = p; render(); });
        row.appendChild(s);
      });
      box.appendChild(row);
      if (state.text === ti && state.pos !== null) {
        var list = el('div', { class: 'featlist small' });
        var act = t.act[state.pos] || [];
        list.appendChild(el('span', { class: 'muted' }, 'features active on \u201c' + tokText(t.t[state.pos]) + '\u201d (' + act.length + '): '));
        act.slice(0, 40).forEach(function (a) {
          var link = el('a', null, '#' + a[0] + ' ' + fmt(a[1]));
          link.addEventListener('click', function () { select(a[0]); });
          list.appendChild(link);
        });
        box.appendChild(list);
      }
    });
    return box;
  }

  function render() {
    var f = feat();
    view.innerHTML = '';
    featInput.value = String(state.feature);
    layerSel.value = String(state.layer);
    var tag = 'M' + layerData().layer + 'N' + f.f;
    view.appendChild(el('h2', { id: 'feature-title' }, 'Feature ' + tag));
    if (f.n === 0) {
      view.appendChild(el('div', { class: 'stats' }, 'Dead on this corpus: never active in ' + data.tokens + ' tokens.'));
    } else {
      view.appendChild(el('div', { class: 'stats' }, 'Active on ' + pct(f.freq) + ' of tokens (' + f.n + ' of ' + data.tokens +
        ') \u00b7 max ' + fmt(f.max) + ' \u00b7 mean when active ' + fmt(f.mean) + ' \u00b7 median ' + fmt(f.q[5]) + ' \u00b7 90th percentile ' + fmt(f.q[9])));
    }
    var grid = el('div', { class: 'grid2' });
    var left = el('div', { class: 'panel' }), right = el('div', { class: 'panel' });
    if (f.n > 0) left.appendChild(histogram(f));
    if (f.logits) {
      var lg = el('div', { class: 'grid2' });
      lg.appendChild(scoreTable('Logits raised (decoder \u00b7 W_U)', f.logits.top));
      lg.appendChild(scoreTable('Logits lowered', f.logits.bottom));
      left.appendChild(lg);
    }
    if (f.deembed) {
      var de = el('div', { class: 'grid2' });
      de.appendChild(scoreTable('De-embedding (direct)', f.deembed));
      (f.heads || []).forEach(function (h) { de.appendChild(scoreTable('Through head ' + h.layer + '.' + h.head + ' (OV norm ' + fmt(h.norm) + ')', h.top)); });
      right.appendChild(de);
    } else right.appendChild(el('div', { class: 'muted' }, 'De-embeddings are shown for transcoders of the MLPs.'));
    grid.appendChild(left); grid.appendChild(right);
    view.appendChild(grid);
    var ex = el('div', { class: 'panel', id: 'top-examples' });
    ex.appendChild(el('h2', null, 'Top activations'));
    if (!f.top.length) ex.appendChild(el('div', { class: 'muted' }, 'none'));
    f.top.forEach(function (e) { ex.appendChild(contextRow(e, f.max)); });
    view.appendChild(ex);
    if (f.bands && f.bands.length) {
      var qb = el('div', { class: 'panel' });
      qb.appendChild(el('h2', null, 'Samples by activation quantile'));
      f.bands.forEach(function (b, i) {
        var d = el('details'); if (i < 2) d.open = true;
        d.appendChild(el('summary', null, 'quantile ' + Math.round(100 * b.lo) + '\u2013' + Math.round(100 * b.hi) + '%'));
        b.ex.forEach(function (e) { d.appendChild(contextRow(e, f.max)); });
        qb.appendChild(d);
      });
      view.appendChild(qb);
    }
    var ut = el('div', { class: 'panel' }); ut.appendChild(userTexts(f)); view.appendChild(ut);
    history.replaceState(null, '', '#layer=' + layerData().layer + '&feature=' + f.f);
    markDrawn('feature');
  }

  function select(fi) {
    var n = layerData().features.length;
    if (!(fi >= 0 && fi < n)) fi = 0;
    state.feature = fi;
    render();
  }

  // start from the hash (#layer=L&feature=F), else the most frequent feature of the first layer
  var h = {};
  location.hash.replace(/^#/, '').split('&').forEach(function (kv) { var p = kv.split('='); if (p.length === 2) h[p[0]] = p[1]; });
  if (h.layer !== undefined) data.layers.forEach(function (l, i) { if (String(l.layer) === h.layer) state.layer = i; });
  fillLive();
  select(h.feature !== undefined ? +h.feature : firstLive());
})();
