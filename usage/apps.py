from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Usage and credits"

    def ready(self):
        from usage.models import Operation
        from usage.selectors import catalog_forget

        post_save.connect(catalog_forget, sender=Operation, dispatch_uid="catalog_forget_save")
        post_delete.connect(catalog_forget, sender=Operation, dispatch_uid="catalog_forget_delete")
        import usage.credits  # noqa: F401  (registers the paid-handler that grants purchased credits)
