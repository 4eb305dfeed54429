"""The PDF renderer may read no file and call no server, whatever an invoice contains."""

import pytest

from invoices import pdf


@pytest.mark.parametrize(
    "url", ["file:///etc/hostname", "http://127.0.0.1:9/x.css", "https://example.com/a.png"]
)
def test_the_pdf_renderer_refuses_every_url(url):
    with pytest.raises(ValueError, match="disallowed protocol"):
        pdf.url_fetcher().fetch(url)
