"""The parts of the page, one module each: render(page) builds the components, wire(page) the events."""
