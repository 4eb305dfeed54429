// Payment methods: the Stripe.js card element and confirmCardSetup. The publishable key and the
// SetupIntent's client secret come from the page as JSON (#stripe-config); no inline script.
// On success the form posts only Stripe's ids (payment method, SetupIntent) to our server; the
// card number never reaches it.
(function () {
  "use strict";
  var form = document.getElementById("card-form");
  var configNode = document.getElementById("stripe-config");
  if (!form || !configNode) return;
  var errors = document.getElementById("card-errors");
  var status = document.getElementById("card-status");
  var button = document.getElementById("card-submit");
  var mount = document.getElementById("card-element");

  function showError(message) {
    errors.textContent = message;
    errors.hidden = !message;
    errors.closest(".field").classList.toggle("has-error", !!message);
  }

  if (typeof window.Stripe !== "function") {
    showError("The card form could not load. Check your connection and reload the page.");
    button.disabled = true;
    return;
  }

  var config = JSON.parse(configNode.textContent);
  var stripe = window.Stripe(config.publishableKey);
  var card = stripe.elements().create("card", { hidePostalCode: false });
  card.mount(mount);
  // Stripe's own element lives in an iframe; a stand-in may put plain inputs here: name them.
  mount.querySelectorAll("input").forEach(function (input) {
    if (!input.getAttribute("aria-label")) {
      var part = (input.getAttribute("placeholder") || "").replace(/_/g, " ");
      input.setAttribute("aria-label", "Card " + part);
    }
  });
  if (card.on) {
    card.on("change", function (event) {
      if (event && event.error) showError(event.error.message);
      else showError("");
    });
  }

  var busy = false;
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (busy) return;
    busy = true;
    button.disabled = true;
    showError("");
    status.textContent = "Checking your card with your bank…";
    var nameInput = form.querySelector("[name=cardholder]");
    var details = { card: card };
    if (nameInput && nameInput.value.trim()) details.billing_details = { name: nameInput.value.trim() };
    stripe.confirmCardSetup(config.clientSecret, { payment_method: details }).then(function (result) {
      if (result.error) {
        busy = false;
        button.disabled = false;
        status.textContent = "";
        showError(((result.error && result.error.message) || "Your card could not be added.") + " Nothing was saved.");
        return;
      }
      var intent = result.setupIntent;
      var pm = typeof intent.payment_method === "string" ? intent.payment_method : intent.payment_method.id;
      form.querySelector("[name=payment_method]").value = pm;
      form.querySelector("[name=setup_intent]").value = intent.id;
      status.textContent = "Saving your card…";
      form.submit();
    }, function () {
      busy = false;
      button.disabled = false;
      status.textContent = "";
      showError("Card payments are unavailable right now; nothing was saved.");
    });
  });
})();
