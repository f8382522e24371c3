from loraq.cli import main

raise SystemExit(main())
