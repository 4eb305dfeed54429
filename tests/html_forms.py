"""What a browser would submit from a form of a page, for tests that fill in real forms."""

from html.parser import HTMLParser


class _FormFields(HTMLParser):
    """The fields a browser would submit from one <form>: inputs, checkboxes, selects, textareas."""

    def __init__(self, form_id):
        super().__init__()
        self.form_id, self.inside, self.data = form_id, False, []
        self._select = self._textarea = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if not self.inside or "name" not in a and tag != "option":
            return
        if tag == "input":
            kind = a.get("type", "text")
            if kind in ("submit", "button") or (kind in ("checkbox", "radio") and "checked" not in a):
                return
            self.data.append((a["name"], a.get("value", "on" if kind == "checkbox" else "")))
        elif tag == "select":
            self._select = a["name"]
        elif tag == "option" and self._select and "selected" in a:
            self.data.append((self._select, a.get("value", "")))
        elif tag == "textarea":
            self._textarea = a["name"]
            self.data.append((a["name"], ""))

    def handle_data(self, data):
        if self._textarea:
            self.data[-1] = (self._textarea, self.data[-1][1] + data)

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None


def form_data(response, form_id) -> dict:
    """The form's fields as a dict of lists, ready to post back."""
    parser = _FormFields(form_id)
    parser.feed(response.content.decode())
    data = {}
    for name, value in parser.data:
        data.setdefault(name, []).append(value.lstrip("\n"))
    return data
