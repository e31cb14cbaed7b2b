"""What the app's page holds: every input's default, bound and choices, and its link (URL state).

Plain Python (no Streamlit), so the state rules are tested directly: `values` turns widget values
into a `Job`; `url` reads and writes the query parameters that reproduce a view.
"""
