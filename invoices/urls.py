from django.urls import path

from invoices import views

billing_patterns = [
    path("invoices/", views.invoices, name="invoices"),
    path("invoices/<str:number>/", views.invoice, name="invoice"),
    path("invoices/<str:number>.pdf", views.invoice_pdf, name="invoice_pdf"),
    path("payment-methods/", views.payment_methods, name="payment_methods"),
    path("payment-methods/add/", views.payment_method_add, name="payment_method_add"),
    path("payment-methods/<int:pk>/default/", views.payment_method_default, name="payment_method_default"),
    path("payment-methods/<int:pk>/remove/", views.payment_method_remove, name="payment_method_remove"),
]
