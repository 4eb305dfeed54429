/* Draws the Plotly figures the server embedded as JSON.
 *
 * Markup: <script type="application/json" id="NAME">{figure}</script> and
 * <div class="chart" data-chart="NAME" hidden></div>. The container stays hidden without
 * JavaScript (a <noscript> note says so); here it is shown and drawn on load, after every htmx
 * swap that brings new charts, and after htmx restores a page from its history cache.
 * Colours of text follow the page (light or dark); backgrounds are transparent.
 */
(function () {
  "use strict";

  var CONFIG = {
    responsive: true,
    displaylogo: false,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"],
    toImageButtonOptions: { filename: "usage" },
  };

  function pageColours(el) {
    var style = window.getComputedStyle(el);
    return { text: style.color, accent: style.getPropertyValue("--accent").trim() || style.color };
  }

  function themed(layout, el) {
    var colours = pageColours(el);
    layout.font = Object.assign({}, layout.font, { color: colours.text });
    layout.modebar = { bgcolor: "rgba(0,0,0,0)", color: colours.text, activecolor: colours.accent };
    layout.hoverlabel = Object.assign({ font: { family: (layout.font || {}).family } }, layout.hoverlabel);
    return layout;
  }

  function draw(el) {
    var source = document.getElementById(el.getAttribute("data-chart"));
    if (!source || typeof window.Plotly === "undefined") return;
    var figure;
    try {
      figure = JSON.parse(source.textContent);
    } catch (e) {
      return;
    }
    el.hidden = false;
    window.Plotly.newPlot(el, figure.data, themed(figure.layout || {}, el), CONFIG);
  }

  function drawIn(root) {
    if (!root || !root.querySelectorAll) return;
    if (root.matches && root.matches("[data-chart]")) draw(root);
    root.querySelectorAll("[data-chart]").forEach(draw);
  }

  function purgeIn(root) {
    if (!root || !root.querySelectorAll || typeof window.Plotly === "undefined") return;
    root.querySelectorAll("[data-chart]").forEach(function (el) {
      window.Plotly.purge(el);
      el.hidden = true;
    });
  }

  function start() {
    drawIn(document);
    // New content from htmx (the range changed): draw what it brought.
    // (The event fires on each swapped-in element; detail.elt is the one that asked.)
    document.body.addEventListener("htmx:afterSettle", function (event) {
      drawIn(event.target);
    });
    // htmx keeps a copy of the page for the Back button: keep it free of drawn charts (large,
    // and lifeless once restored), and draw them again when that copy comes back.
    document.body.addEventListener("htmx:beforeHistorySave", function (event) {
      purgeIn(event.detail && event.detail.historyElt ? event.detail.historyElt : document.body);
    });
    document.body.addEventListener("htmx:historyRestore", function () {
      drawIn(document);
    });
    // Follow the system's light or dark mode while the page is open.
    if (window.matchMedia) {
      var query = window.matchMedia("(prefers-color-scheme: dark)");
      var redraw = function () {
        document.querySelectorAll("[data-chart]").forEach(function (el) {
          if (el.hidden || !el.data) return;
          var colours = pageColours(el);
          window.Plotly.relayout(el, {
            "font.color": colours.text,
            "modebar.color": colours.text,
            "modebar.activecolor": colours.accent,
          });
        });
      };
      if (query.addEventListener) query.addEventListener("change", redraw);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
