// Copy buttons: <button data-copy-target="ID" data-copy-status="STATUS-ID" hidden> copies the value
// (or the text) of #ID and says so in #STATUS-ID. Without JavaScript the button stays hidden and
// the read-only field can be selected and copied by hand.
(function () {
  "use strict";

  function say(button, words) {
    var status = document.getElementById(button.getAttribute("data-copy-status") || "");
    if (status) status.textContent = words;
  }

  function selectAll(el) {
    if (typeof el.select === "function") {
      el.focus();
      el.select();
      return;
    }
    var range = document.createRange();
    range.selectNodeContents(el);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function legacyCopy(el) {
    selectAll(el);
    try {
      return document.execCommand("copy");
    } catch (e) {
      return false;
    }
  }

  function setUp(root) {
    root.querySelectorAll("[data-copy-target]").forEach(function (button) {
      if (button.dataset.copyReady) return;
      button.dataset.copyReady = "1";
      var label = button.textContent;
      button.hidden = false;
      button.addEventListener("click", function () {
        var el = document.getElementById(button.getAttribute("data-copy-target"));
        if (!el) return;
        var text = "value" in el ? el.value : el.textContent;
        var done = function () {
          button.textContent = "Copied";
          say(button, "Copied to the clipboard.");
          window.setTimeout(function () { button.textContent = label; }, 2000);
        };
        var failed = function () {
          selectAll(el);
          say(button, "Could not copy: the key is selected, press Ctrl+C (⌘C on a Mac).");
        };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done, function () {
            if (legacyCopy(el)) { done(); } else { failed(); }
          });
        } else if (legacyCopy(el)) {
          done();
        } else {
          failed();
        }
      });
    });
    root.querySelectorAll("input.secret[readonly]").forEach(function (input) {
      input.addEventListener("focus", function () { input.select(); });
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { setUp(document); });
  } else {
    setUp(document);
  }
})();
