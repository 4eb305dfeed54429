from django.apps import AppConfig


class InvoicesConfig(AppConfig):
    name = "invoices"
    verbose_name = "Invoices and payments"

    def ready(self):
        from invoices.period_billing import handlers_register

        handlers_register()  # so a period invoice's charge settled after a crash is followed up the same
