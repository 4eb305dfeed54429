"""What several apps' admin classes share."""

from auditlog.mixins import AuditlogHistoryAdminMixin
from django.contrib.admin.utils import unquote
from django.http import Http404


class ReadOnlyAdminMixin:
    """Viewable lists and pages; nothing added, changed or deleted through admin."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class AuditHistoryMixin(AuditlogHistoryAdminMixin):
    """django-auditlog's "Audit log" page of an object (linked from its change form). An id that
    names nothing is a 404, where the library's view would fail with a 500."""

    def auditlog_history_view(self, request, object_id, extra_context=None):
        if self.get_object(request, unquote(object_id)) is None:
            raise Http404("There is no such object.")
        return super().auditlog_history_view(request, object_id, extra_context)
