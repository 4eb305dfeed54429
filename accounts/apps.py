from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"

    def ready(self):
        from accounts.services import upgrade_handler_register

        upgrade_handler_register()  # so the payment reconciler can finish an upgrade after a crash
