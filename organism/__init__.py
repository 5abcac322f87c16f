"""The organism: the recipe that pretrained the bundled model (a small ALiBi BLOOM whose low-slope heads
collapsed). Built on `engine`; the surgery core never imports it."""
