"""The Starlight layer format: the tar reader (``tar``), gzip members (``members``), the
writer (``writer``), the scanner and decoder (``scan``) and the TOC model (``toc``)."""

__all__: list[str] = []
