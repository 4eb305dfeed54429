"""Invoices, lines, payments, payment methods and Stripe webhooks (the invoices issue)."""
