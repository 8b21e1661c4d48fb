"""The Gradio playground: layout (components + wiring), handlers, plots, session state."""
