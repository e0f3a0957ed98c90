// Prints a Dockerfile as JSON: the dockerfile-utils linter's diagnostics (the checks of
// VS Code's Docker extension) and every instruction as dockerfile-ast parses it.
// usage: node parse_dockerfile.js NODE_MODULES_DIR Dockerfile
'use strict';
const fs = require('fs');
const path = require('path');
const modules = path.resolve(process.argv[2]);
const utils = require(path.join(modules, 'dockerfile-utils'));
const ast = require(path.join(modules, 'dockerfile-ast'));
const text = fs.readFileSync(process.argv[3], 'utf8');
const diagnostics = utils.validate(text, {}).map(d => ({
  severity: d.severity,  // 1 error, 2 warning
  line: d.range.start.line + 1,
  message: d.message,
}));
const instructions = ast.DockerfileParser.parse(text).getInstructions().map(i => ({
  keyword: i.getKeyword(),
  line: i.getRange().start.line + 1,
  args: i.getArguments().map(a => a.getValue()),
  flags: (i.getFlags ? i.getFlags() : []).map(f => ({name: f.getName(), value: f.getValue()})),
  content: i.getArgumentsContent() || '',
}));
process.stdout.write(JSON.stringify({diagnostics, instructions}, null, 1) + '\n');
