"""Every URL pattern of the site, read from the URL conf, so that a page added tomorrow is in the
security checks without anyone remembering to list it."""

import re
from dataclasses import dataclass

from django.apps import apps
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from django.urls.resolvers import RoutePattern

_ROUTE_PARAM = re.compile(r"<(?:(?P<converter>[^>:]+):)?(?P<name>\w+)>")
_REGEX_PARAM = re.compile(r"\(\?P<(?P<name>\w+)>(?:[^()]|\([^()]*\))*\)")
# Values tried, in order, for a parameter whose value does not matter: the first one with which
# the built URL resolves back to the same pattern is used.
_ANY_VALUES = ("1", "accounts", "x")


@dataclass(frozen=True)
class Route:
    name: str  # "billing:invoice"; for an unnamed pattern, its namespace and its route
    parts: tuple  # the pattern of each level, outermost first
    params: tuple[str, ...]
    callback: object

    @property
    def namespace(self) -> str:
        return self.name.split(":", 1)[0] if ":" in self.name else ""

    @property
    def template(self) -> str:
        return "/" + "".join(str(part) for part in self.parts)

    def url(self, **values) -> str:
        """The URL with `values` for its parameters (any missing one gets a value that resolves)."""
        missing = [p for p in self.params if p not in values]
        if not missing:
            return self._build(values)
        for candidate in _ANY_VALUES:
            url = self._build({**{p: candidate for p in missing}, **values})
            if self.resolves(url):
                return url
        raise AssertionError(f"no value of {missing} makes {self.template} resolve")

    def resolves(self, url: str) -> bool:
        try:
            match = resolve(url.split("?", 1)[0])
        except Exception:  # noqa: BLE001 - Resolver404 or a converter refusing the value
            return False
        return match.func is self.callback and match.route == self._route()

    def _route(self) -> str:
        """As ResolverMatch.route spells it: an inner regular expression loses its leading ^."""
        texts = [str(part) for part in self.parts]
        return texts[0] + "".join(text.removeprefix("^") for text in texts[1:])

    def _build(self, values: dict) -> str:
        url = "/"
        for part in self.parts:
            text = str(part)
            if isinstance(part, RoutePattern):
                text = _ROUTE_PARAM.sub(lambda m: str(values[m["name"]]), text)
            else:  # a regular expression: fill each named group, drop the anchors
                text = _REGEX_PARAM.sub(lambda m: str(values[m["name"]]), text).lstrip("^").rstrip("$")
            url += text
        return url


def _params(pattern) -> list[str]:
    converters = getattr(pattern, "converters", {})
    groups = list(pattern.regex.groupindex)
    return list(dict.fromkeys([*converters, *groups]))


def _walk(resolver, parts, namespaces):
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            inner = [*namespaces, entry.namespace] if entry.namespace else namespaces
            yield from _walk(entry, [*parts, entry.pattern], inner)
        elif isinstance(entry, URLPattern):
            chain = [*parts, entry.pattern]
            namespace = ":".join(namespaces)
            label = entry.name or "".join(str(p) for p in chain)
            name = f"{namespace}:{label}" if namespace else label
            params = tuple(dict.fromkeys(p for part in chain for p in _params(part)))
            yield Route(name, tuple(chain), params, entry.callback)


def all_routes() -> list[Route]:
    return list(_walk(get_resolver(), [], []))


def parameterised_routes() -> list[Route]:
    return [route for route in all_routes() if route.params]


def admin_routes() -> list[Route]:
    """Every admin URL but signing in and out (the only admin pages for everyone)."""
    return [
        r for r in all_routes() if r.namespace == "admin" and r.name not in ("admin:login", "admin:logout")
    ]


def admin_url(route: Route) -> str:
    """The admin URL with a real object's id on a model's pages (any value for the rest)."""
    values = {}
    label = route.name.split(":", 1)[1]
    for model in apps.get_models():
        opts = model._meta
        if (
            label.startswith(f"{opts.app_label}_{opts.model_name}_")
            or f"/{opts.app_label}/{opts.model_name}/" in label
        ):
            pk = model._default_manager.values_list("pk", flat=True).first()
            for param in set(route.params) & {"object_id", "id"}:
                values[param] = pk if pk is not None else 1
    return route.url(**values)
