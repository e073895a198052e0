"""The Gradio Space of dreaming-vla (app.py); see README.md for its Hub metadata."""
