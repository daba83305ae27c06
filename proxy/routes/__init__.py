"""One module per endpoint family; each is thin: parse input, call the pump."""
