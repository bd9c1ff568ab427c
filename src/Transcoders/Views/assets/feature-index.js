// The index of feature pages: per coder and layer, a histogram of log10 firing frequency over its features
// (the transcoder paper's dead/dense plot), the dead and dense counts, and a link to the coder's page.
(function () {
  var data = pageData();
  var app = document.getElementById('app');
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) { if (k === 'class') e.className = attrs[k]; else e.setAttribute(k, attrs[k]); }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  data.coders.forEach(function (c) {
    var card = el('div', { class: 'coder-card' });
    var h = el('h2'); var a = el('a', { href: c.page }, c.name); h.appendChild(a); card.appendChild(h);
    card.appendChild(el('div', { class: 'muted small' }, c.description + ' \u00b7 model ' + c.model + ' \u00b7 ' + c.tokens + ' tokens'));
    c.layers.forEach(function (l) {
      var live = l.freq.filter(function (f) { return f > 0; });
      var dead = l.freq.length - live.length;
      var dense = l.freq.filter(function (f) { return f > 0.1; }).length;
      var logs = live.map(function (f) { return Math.log10(f); });
      card.appendChild(el('div', null, 'layer ' + l.layer + ': ' + l.freq.length + ' features, ' + dead + ' dead, ' + dense + ' dense (> 10% of tokens); median frequency of live features ' +
        (logs.length ? Math.pow(10, d3.median(logs)).toPrecision(2) : '\u2013')));
      var w = 520, hh = 140, m = { l: 40, r: 8, t: 6, b: 30 };
      var svg = d3.select(card).append('svg').attr('width', w).attr('height', hh).attr('class', 'density');
      var x = d3.scaleLinear().domain([Math.min(-5, d3.min(logs) || -5), 0]).range([m.l, w - m.r]);
      var bins = d3.bin().domain(x.domain()).thresholds(x.ticks(30))(logs);
      var y = d3.scaleLinear().domain([0, d3.max(bins, function (b) { return b.length; }) || 1]).nice().range([hh - m.b, m.t]);
      svg.selectAll('rect').data(bins).enter().append('rect')
        .attr('x', function (b) { return x(b.x0) + 0.5; }).attr('width', function (b) { return Math.max(1, x(b.x1) - x(b.x0) - 1); })
        .attr('y', function (b) { return y(b.length); }).attr('height', function (b) { return y(0) - y(b.length); }).attr('fill', '#4a89c8');
      svg.append('g').attr('transform', 'translate(0,' + (hh - m.b) + ')').call(d3.axisBottom(x).ticks(6));
      svg.append('g').attr('transform', 'translate(' + m.l + ',0)').call(d3.axisLeft(y).ticks(4));
      svg.append('text').attr('x', w / 2).attr('y', hh - 2).attr('text-anchor', 'middle').text('log10 firing frequency');
    });
    app.appendChild(card);
  });
  markDrawn('index');
})();
