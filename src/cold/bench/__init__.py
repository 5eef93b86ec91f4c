"""`cold bench`'s machinery: `run` (settings, one fresh process per measuring cell, the end-to-end mode),
`cells` (what one process loads and times), `report` (tables, Markdown, plots, the speed targets)."""
