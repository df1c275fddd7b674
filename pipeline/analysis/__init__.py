"""Weight and representation analyses: heavy-tail spectra (``heavytail``) and CKA similarity (``cka``)."""
